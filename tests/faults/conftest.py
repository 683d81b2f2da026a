"""Shared pieces of the fault tests: the tiny model, its greedy reference run,
worker processes read line by line with bounded waits, and a redis-server."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvcluster.common.config import to_dict
from kvcluster.engine.tiny import write_tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny-faults") / "llama")


_RUNNERS: dict = {}


def reference_tokens(config, prompt, params, stop_on_eos: bool = False) -> list[int]:
    """Greedy tokens of the same tiny model computed locally in one engine."""
    from kvcluster.engine.llm_engine import LLMEngine
    from kvcluster.worker.node import build_runner

    key = (config.model.path, config.model.dtype, config.engine.block_size)
    if key not in _RUNNERS:  # one runner per model: the engine frees its blocks after each run
        _RUNNERS[key] = build_runner(config)
    engine = LLMEngine(_RUNNERS[key], stop_on_eos=stop_on_eos)
    return engine.generate([list(prompt)], params)[0]


class WorkerProc:
    """``python -m tests.faults.procs ROLE CONFIG`` (optionally inside a netns)."""

    def __init__(self, role: str, config, prefix: list[str] = ()):
        argv = [*prefix, sys.executable, "-m", "tests.faults.procs", role,
                json.dumps(to_dict(config))]
        self.proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout_s: float) -> str:
        """The next line starting with ``prefix`` (others skipped); bounded wait."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line within {timeout_s} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line == "" and self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}) before {prefix!r}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def result(self, timeout_s: float) -> dict:
        return json.loads(self.expect("result ", timeout_s))

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except Exception:
                pass
        if self.proc.poll() is None:
            self.kill()


@pytest.fixture
def redis_binary():
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server binary not installed")
    return binary
