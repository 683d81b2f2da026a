"""A server bench.serve starts as a subprocess on 127.0.0.1, and is sure to stop.

Each server runs in its own session (process group), so stopping it also ends the
children it spawned (Ray's raylet and workers, vLLM's engine core): SIGTERM to the
server first (it shuts down cleanly), then SIGKILL to its whole group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the server binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One server subprocess; its output goes to ``log_path``."""

    def __init__(self, name: str, command: list[str], env: dict, log_path: Path, url: str):
        """
        Args:
            url: the server's root, e.g. ``http://127.0.0.1:8000`` (the OpenAI API is
                under ``/v1``).
        """
        self.name = name
        self.url = url
        self.base_url = f"{url}/v1"
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.started_at = time.monotonic()
        self.ready_s: float | None = None
        self.process = subprocess.Popen(command, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def wait_ready(self, timeout_s: float) -> float:
        """Wait until ``GET /v1/models`` answers 200; returns the seconds since start.

        Raises:
            RuntimeError: the process exited, or it did not answer within ``timeout_s``
                (the message ends with the tail of its log).
        """
        end = self.started_at + timeout_s
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode} "
                                   f"while starting:\n{self.log_tail()}")
            if self._answers():
                self.ready_s = time.monotonic() - self.started_at
                return self.ready_s
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} did not answer on {self.url} within {timeout_s:.0f} s:"
                           f"\n{self.log_tail()}")

    def model_names(self) -> list[str]:
        with urllib.request.urlopen(f"{self.base_url}/models", timeout=10) as response:
            return [card["id"] for card in json.load(response)["data"]]

    def log_tail(self, num_lines: int = 25) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-num_lines:])

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL the server's process group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        self.process.wait(10)
        self._log.close()

    # ------------------------------------------------------------------ private

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _kill_group(self) -> None:
        """The group is the server's own (start_new_session): its pid is the group id."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
