"""engine.vllm_args that would split a vLLM engine over several workers or
data-parallel ranks are refused when the config is built (no engine needed)."""

from __future__ import annotations

import pytest

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict


def _config(**vllm_args) -> ClusterConfig:
    return from_dict(ClusterConfig, {"engine": {"kind": "vllm", "vllm_args": vllm_args}})


@pytest.mark.parametrize("name", ["data_parallel_size", "data_parallel_size_local"])
def test_data_parallelism_is_refused_with_why(name):
    with pytest.raises(ConfigError, match=rf"engine\.vllm_args\.{name}: must be 1, got 2") \
            as caught:
        _config(**{name: 2})
    assert "ports the router does not watch" in str(caught.value)
    assert "workers.num_decode" in str(caught.value)


@pytest.mark.parametrize("name", ["tensor_parallel_size", "pipeline_parallel_size",
                                  "decode_context_parallel_size"])
def test_sharding_one_engines_kv_is_refused(name):
    with pytest.raises(ConfigError, match=rf"engine\.vllm_args\.{name}: must be 1, got 4"
                       ) as caught:
        _config(**{name: 4})
    assert "sharded across workers" in str(caught.value)


def test_data_parallel_load_balancing_modes_are_refused():
    with pytest.raises(ConfigError, match=r"vllm_args\.data_parallel_external_lb: vLLM data "
                                          r"parallelism is not supported"):
        _config(data_parallel_external_lb=True)


def test_a_size_that_is_not_an_integer_is_refused():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size: must be an integer, got '2'"):
        _config(tensor_parallel_size="2")


def test_one_worker_and_other_vllm_args_pass():
    config = _config(tensor_parallel_size=1, data_parallel_size=1, enforce_eager=True,
                     data_parallel_external_lb=False)
    assert config.engine.vllm_args["enforce_eager"] is True
