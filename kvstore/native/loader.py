"""Build ``nt_copy.c`` once per machine into a cache folder and load it with ctypes.

Nothing is downloaded: the C file ships with the package and is compiled
with the system's ``cc`` into ``$XDG_CACHE_HOME/kvcluster/native/`` (a
content hash in the file name; written to a temp file and renamed, so
concurrent processes never load a half-written library). Without a
compiler, on a non-x86-64 CPU, or with ``KVSTORE_NATIVE_COPY=0``,
:func:`load_nt_copy` returns None and callers fall back to numpy.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("nt_copy.c")


@functools.lru_cache(maxsize=None)
def load_nt_copy():
    """The C function ``kv_nt_copy_2d`` (see nt_copy.c), or None."""
    if os.environ.get("KVSTORE_NATIVE_COPY", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("kvstore: native copy unavailable (%s); using numpy", exc)
        return None
    fn = lib.kv_nt_copy_2d
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_void_p, ctypes.c_ssize_t,
                   ctypes.c_size_t, ctypes.c_size_t]
    return fn


def _build() -> Path:
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvcluster/native"
    target = out_dir / f"nt_copy-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        raise OSError("no C compiler")
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                       check=True, capture_output=True, timeout=60)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target
