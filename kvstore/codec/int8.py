"""Baseline: 8-bit per-token quantization (absmax over one token's heads and dims).

Per (layer, K/V, token) an fp16 scale ``max|x| / 127``; symbols are the raw int8
values, with no entropy coding: this is the "quantization baseline" the levels
are measured against. Error bound: ``|x - xhat| <= scale / 2`` per element.
"""

from __future__ import annotations

import torch

from kvcluster.common.layout import KVLayout
from kvstore.codec.base import CodecError, KVCodec
from kvstore.codec.dtypes import check_chunk, torch_dtype
from kvstore.codec.hint import EncodeHint
from kvstore.codec.quantize import MAX_SYMBOL, fp16_steps
from kvstore.codec.sections import read_tensor, tensor_section
from kvstore.codec.stream import pack_stream, unpack_stream

INT8_ID = 1


class Int8Codec(KVCodec):
    name = "int8"

    def encode(self, kv: torch.Tensor, layout: KVLayout, hint: EncodeHint | None = None) -> bytes:
        num_tokens = check_chunk(kv, layout, hint)  # the hint is checked, then not needed
        x = _planes(kv.detach().cpu().float(), layout, num_tokens)  # [P, T, C]
        scales = fp16_steps(x.abs().amax(-1) / MAX_SYMBOL)  # [P, T]
        symbols = torch.round(x / scales.float().unsqueeze(-1)).to(torch.int8)
        sections = [tensor_section(scales), tensor_section(symbols)]
        return pack_stream(INT8_ID, layout, num_tokens, 0, sections)

    def decode(self, data: bytes | memoryview, layout: KVLayout) -> torch.Tensor:
        info = unpack_stream(data, layout, INT8_ID)
        if len(info.sections) != 2:
            raise CodecError(f"int8 stream must hold 2 sections, got {len(info.sections)}")
        num_planes, channels = layout.num_layers * 2, layout.num_kv_heads * layout.head_dim
        scales = read_tensor(info.sections[0], torch.float16, (num_planes, info.num_tokens), "int8 scales")
        symbols = read_tensor(info.sections[1], torch.int8, (num_planes, info.num_tokens, channels),
                              "int8 symbols")
        if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
            raise CodecError("int8 scales must be finite and non-negative")
        x = symbols.float() * scales.float().unsqueeze(-1)
        return x.to(torch_dtype(layout)).reshape(layout.shape(info.num_tokens))


def _planes(x: torch.Tensor, layout: KVLayout, num_tokens: int) -> torch.Tensor:
    return x.reshape(layout.num_layers * 2, num_tokens, layout.num_kv_heads * layout.head_dim)
