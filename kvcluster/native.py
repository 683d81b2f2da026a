"""Build a C file shipped with the package once per machine, and load it with ctypes.

Nothing is downloaded: the source is compiled with the system's ``cc`` (or
``$CC``) into ``$XDG_CACHE_HOME/kvcluster/native/``. The file name carries a
hash of the source (and of the files it includes from its folder), the flags
and, for ``-march=native`` builds, the CPU's model and feature flags (a cache
folder shared by machines with different CPUs never hands one a library with
instructions it lacks). The library is written to a temp file and renamed, so
concurrent processes never load a half-written one. Pure Python (no torch):
kvstore and the engine both use it.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
COMPILE_TIMEOUT_S = 120


def load_library(source: Path, flags: tuple[str, ...], disable_env: str) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` (cached), or None when unavailable.

    Args:
        source: a C file; the library is named after its stem.
        flags: compiler flags besides ``-shared -fPIC -o OUT``.
        disable_env: an environment variable that, set to "0", disables it.
    Returns:
        The loaded library; None when disabled, not on x86-64, without a
        compiler, or when the build or load fails (logged).
    """
    if os.environ.get(disable_env, "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        return ctypes.CDLL(str(_build(source, flags)))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("native %s unavailable (%s); using the fallback", source.name, exc)
        return None


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvcluster/native"


# ---------------------------------------------------------------------- private


def _build(source: Path, flags: tuple[str, ...]) -> Path:
    target = cache_dir() / f"{source.stem}-{_digest(source, flags)}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *flags, "-shared", "-fPIC", "-o", tmp, str(source)]
        result = subprocess.run(command, check=False, capture_output=True,
                                timeout=COMPILE_TIMEOUT_S)
        if result.returncode != 0:
            raise OSError(f"cc failed: {result.stderr.decode(errors='replace')[-500:]}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _digest(source: Path, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256(source.read_bytes())
    for header in _local_includes(source):  # an edited header must rebuild too
        h.update(header.read_bytes())
    h.update("\0".join(flags).encode())
    if "-march=native" in flags:
        h.update(_cpu_identity().encode())
    return h.hexdigest()[:16]


def _local_includes(source: Path) -> list[Path]:
    """The files ``source`` includes with ``#include "name"`` from its own folder."""
    names = re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), re.MULTILINE)
    return [source.parent / name for name in names]


def _cpu_identity() -> str:
    """The CPU model and feature flags (Linux), else the platform's processor name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags")
    return "\n".join(sorted({ln for ln in lines if ln.split(":")[0].strip() in keys}))
