"""dtype/device "auto": what the hardware computes fast, and a loud fp16-on-CPU warning."""

from __future__ import annotations

import logging

import pytest
import torch

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict
from kvcluster.engine.placement import cpu_has_native_bf16, resolve_device, resolve_dtype


def test_auto_is_bf16_on_cuda_and_on_cpus_with_native_bf16():
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert resolve_dtype("auto", "cpu") == expected
    assert cpu_has_native_bf16() == bool(torch.cpu._is_avx512_bf16_supported()
                                         or torch.cpu._is_amx_tile_supported())


def test_explicit_dtypes_are_kept_and_fp16_on_cpu_warns(caplog):
    assert resolve_dtype("float32", "cpu") == "float32"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="kvcluster.engine.placement"):
        assert resolve_dtype("float16", "cpu") == "float16"
    assert "many times slower" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvcluster.engine.placement"):
        assert resolve_dtype("float16", "cuda") == "float16"
    assert not caplog.text
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "cpu")


def test_config_defaults_to_auto_and_rejects_unknown_dtypes():
    assert ClusterConfig().model.dtype == "auto"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="model.dtype"):
        from_dict(ClusterConfig, {"model": {"dtype": "fp8"}})


def test_runner_loads_auto_in_the_resolved_dtype(tiny_dirs):
    from kvcluster.engine.runner import ModelRunner

    runner = ModelRunner.from_pretrained(tiny_dirs["llama"], dtype="auto")
    assert runner.layout.dtype == resolve_dtype("auto", "cpu")
