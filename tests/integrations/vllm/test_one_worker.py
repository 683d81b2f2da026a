"""The last guard before vLLM starts: engine arguments that split the engine over
several workers or data-parallel ranks raise ValueError (no engine is started)."""

from __future__ import annotations

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs

from kvcluster.common.config import ClusterConfig, EngineConfig
from kvcluster.integrations.vllm.engine_args import check_one_worker, engine_args


def test_a_config_changed_after_validation_is_still_refused(smollm2_dir):
    """The config refused data_parallel_size 2 when built; set afterwards, engine_args
    refuses it."""
    config = ClusterConfig(engine=EngineConfig(kind="vllm", block_size=32))
    config.engine.vllm_args["data_parallel_size"] = 2
    with pytest.raises(ValueError, match=r"'data_parallel_size': 2.*one vLLM worker per "
                                         r"engine.*shifted ports"):
        engine_args(config, "decode-0")


def test_vllms_dp_environment_variable_is_refused(monkeypatch):
    args = AsyncEngineArgs(model="unused")
    check_one_worker(args)  # one worker: fine
    monkeypatch.setenv("VLLM_DP_SIZE", "2")
    with pytest.raises(ValueError, match=r"VLLM_DP_SIZE \(environment\)"):
        check_one_worker(args)


def test_tensor_parallelism_is_refused_before_the_connector_sees_it():
    with pytest.raises(ValueError, match=r"'tensor_parallel_size': 2"):
        check_one_worker(AsyncEngineArgs(model="unused", tensor_parallel_size=2))
