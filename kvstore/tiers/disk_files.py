"""One chunk file on disk: read and check it, encode and write it durably.

Plain functions over a :class:`~kvstore.chunk_spec.ChunkSpec`; the disk tier
(:mod:`kvstore.tiers.disk`) owns the index, the staging rows and the threads.
File format: :mod:`kvstore.tiers.disk_format`; why reads use O_DIRECT:
:mod:`kvstore.tiers.direct_io`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import torch
import zstandard

from kvstore.chunk_spec import ChunkSpec
from kvstore.copy import copy_kv
from kvstore.tiers.direct_io import AlignedBuffer, open_for_read, read_whole
from kvstore.tiers.disk_format import (
    FLAG_ZSTD, HEADER_SIZE, ChunkHeader, CorruptChunk, checksum,
)


class ReadBuffers:
    """One reader's preallocated buffers (no allocation per read).

        file:   uint8 [round_up(128 + chunk_bytes, 2 MiB)]  whole file, O_DIRECT target
        decode: uint8 [chunk_bytes]   zstd output when the destination is not contiguous
    """

    def __init__(self, chunk_bytes: int):
        self.file = AlignedBuffer(HEADER_SIZE + chunk_bytes)
        self.payload = torch.frombuffer(self.file.view, dtype=torch.uint8)[
            HEADER_SIZE : HEADER_SIZE + chunk_bytes]
        """The raw payload's place inside ``file``."""
        self.decode = torch.zeros(chunk_bytes, dtype=torch.uint8)


# ---------------------------------------------------------------- reads


def read_chunk_file(spec: ChunkSpec, path: Path, key: bytes, dst: torch.Tensor,
                    bufs: ReadBuffers) -> None:
    """Whole file (header + payload) into ``bufs.file`` with one O_DIRECT read,
    check it, then one copy into ``dst``.

    Raises:
        CorruptChunk: the file fails any check (never a partly written ``dst`` served).
        OSError: the file cannot be read.
    """
    fd, direct = open_for_read(path)
    try:
        size = os.fstat(fd).st_size
        if size > HEADER_SIZE + spec.chunk_bytes:
            raise CorruptChunk(f"file is {size} bytes, more than a chunk")
        nread = read_whole(fd, direct, size, bufs.file.view)
    finally:
        os.close(fd)
    if nread < HEADER_SIZE:  # the buffer past nread holds an older file's bytes
        raise CorruptChunk(f"header truncated ({nread} bytes)")
    header = ChunkHeader.unpack(bufs.file.view[:HEADER_SIZE])
    check_header(spec, header, key, size)
    payload = bufs.file.view[HEADER_SIZE : header.file_size]
    if nread != header.file_size or checksum(payload) != header.payload_checksum:
        raise CorruptChunk("payload checksum mismatch")
    if header.compressed:
        _decode_to(spec, payload, header, dst, bufs)
    else:
        copy_kv(dst, spec.typed(bufs.payload))


def check_header(spec: ChunkSpec, header: ChunkHeader, key: bytes, file_size: int) -> None:
    layout = spec.layout
    if header.key != key:
        raise CorruptChunk("key in header does not match the file name")
    if header.layout_fingerprint != layout.fingerprint:
        raise CorruptChunk(f"layout {header.layout_identity} is not {layout.identity}")
    if header.chunk_tokens != spec.chunk_tokens or header.raw_len != spec.chunk_bytes:
        raise CorruptChunk("chunk size mismatch")
    if header.payload_len > header.raw_len or file_size != header.file_size:
        raise CorruptChunk(f"file is {file_size} bytes, header says {header.file_size}")


def _decode_to(spec: ChunkSpec, payload, header: ChunkHeader, dst: torch.Tensor,
               bufs: ReadBuffers) -> None:
    direct = dst.device.type == "cpu" and dst.is_contiguous()
    target = bytes_of(dst) if direct else bufs.decode.numpy()
    _decompress_into(payload, header, target)
    if not direct:
        copy_kv(dst, spec.typed(bufs.decode))


def _decompress_into(payload, header: ChunkHeader, target) -> None:
    if len(payload) != header.payload_len or checksum(payload) != header.payload_checksum:
        raise CorruptChunk("payload checksum mismatch")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=header.raw_len)
    except zstandard.ZstdError as exc:  # a flag or frame that lies: corrupt, not a crash
        raise CorruptChunk(f"zstd payload does not decode: {exc}") from None
    if len(raw) != header.raw_len:
        raise CorruptChunk("decompressed length mismatch")
    target[:] = memoryview(raw)


# ---------------------------------------------------------------- writes


def encode_chunk(spec: ChunkSpec, key: bytes, raw, compressor: zstandard.ZstdCompressor | None
                 ) -> tuple[ChunkHeader, object]:
    """The header and payload of a chunk file; zstd only when it makes the payload smaller."""
    payload, flags = raw, 0
    if compressor is not None:
        packed = compressor.compress(raw)
        if len(packed) < len(raw):
            payload, flags = packed, FLAG_ZSTD
    layout = spec.layout
    header = ChunkHeader(key, layout.fingerprint, layout.identity, spec.chunk_tokens,
                         len(raw), len(payload), checksum(payload), flags)
    return header, payload


def write_chunk_file(tmp: Path, header: bytes, payload,
                     after_partial_write: Callable[[Path], None] | None = None) -> None:
    """Write and fsync a new temp file (the caller renames it into place)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, memoryview(header))
        view = memoryview(payload).cast("B")
        half = len(view) // 2 if after_partial_write else len(view)
        _write_all(fd, view[:half])
        if after_partial_write:
            after_partial_write(tmp)
        _write_all(fd, view[half:])
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_directory(root: Path):
    """An exclusive ``flock`` on ``root/.lock`` (one store per directory); keep the handle."""
    handle = open(root / ".lock", "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RuntimeError(f"{root} is in use by another kvstore process") from None
    return handle


def bytes_of(t: torch.Tensor):
    """A writable uint8 numpy view of a contiguous CPU tensor's bytes."""
    return t.view(-1).view(torch.uint8).numpy()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]
