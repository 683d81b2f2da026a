"""bench.serve_crosscheck: vLLM's own load generator against a real kvcluster HTTP server."""

from __future__ import annotations

import pytest

from bench.serve_crosscheck import run_generator
from tests.server.http.conftest import MODEL

pytest.importorskip("vllm.benchmarks.serve")


def test_vllms_load_generator_completes_every_request_at_full_length(http_server, tiny_dir,
                                                                      tmp_path):
    # Its random dataset sends ignore_eos: every answer is exactly output_tokens long.
    figures = run_generator(http_server.base_url, concurrency=2, prompts=4,
                            result=tmp_path / "result.json", model=MODEL,
                            tokenizer=str(tiny_dir), prefix_tokens=32, input_tokens=16,
                            output_tokens=8)
    assert figures["completed"] == 4 and figures["failed"] == 0, figures
    assert figures["output_tokens"] == 4 * 8
    assert figures["ttft_p50_ms"] > 0 and figures["output_tokps"] > 0
