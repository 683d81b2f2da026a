"""Render the one cluster file that `kvcluster serve --config` reads.

Deployments keep a base file (``deploy/cluster.example.yaml``, or the Helm
ConfigMap) and complete it where they start:

* ``--merge FRAGMENT.yaml`` deep-merges a partial file over the base, e.g. the
  Kubernetes Secret's ``security.yaml`` (bearer tokens stay out of the ConfigMap);
* ``--set a.b.c=VALUE`` sets one field, VALUE parsed as YAML (``8``, ``true``,
  ``redis://10.0.0.5:6379/0``), e.g. the Redis address only known on the head node.

The result is validated with the same code as ``kvcluster config check`` (an
error names the bad field) and written with every field explicit, mode 0600
because it may hold tokens::

    python -m kvcluster.deploy_config render deploy/cluster.example.yaml \\
        --merge secret/security.yaml --set redis_url=redis://10.0.0.5:6379/0 -o cluster.yaml
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from kvcluster.common.config import ClusterConfig, ConfigError, from_dict, to_dict


def render_config(base: str | Path | None = None, merges: Sequence[str | Path] = (),
                  sets: Sequence[str] = ()) -> ClusterConfig:
    """Build and validate a ClusterConfig from a base file, fragments and overrides.

    Args:
        base: a cluster YAML file; None starts from the defaults.
        merges: partial cluster YAML files, deep-merged in order over the base.
        sets: ``dotted.path=value`` overrides applied last, values parsed as YAML.
    Returns:
        The validated config.
    Raises:
        ConfigError: naming the bad field or file.
    """
    data = _read_mapping(base) if base else {}
    for fragment in merges:
        data = deep_merge(data, _read_mapping(fragment))
    for assignment in sets:
        set_dotted(data, *parse_assignment(assignment))
    return from_dict(ClusterConfig, data)


def dump_config(config: ClusterConfig) -> str:
    """The config as YAML with every field explicit, in declaration order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def write_config(config: ClusterConfig, path: str | Path) -> None:
    """Write ``dump_config(config)`` to ``path`` with mode 0600 (it may hold tokens)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(dump_config(config))
    path.chmod(0o600)


def deep_merge(base: dict, overlay: dict) -> dict:
    """A new dict: ``overlay`` over ``base``, mappings merged key by key, others replaced."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_assignment(assignment: str) -> tuple[str, Any]:
    """``"store.host.capacity_bytes=1024"`` -> ``("store.host.capacity_bytes", 1024)``."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError("", f"--set expects dotted.key=value, got {assignment!r}")
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"value {raw!r} is not valid YAML: {exc}") from exc
    return key.strip(), value


def set_dotted(data: dict, dotted_key: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``"a.b.c"``, creating mappings on the way."""
    *parents, leaf = dotted_key.split(".")
    node = data
    for i, name in enumerate(parents):
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: i + 1]), "is not a mapping")
    node[leaf] = value


# ---------------------------------------------------------------- helpers


def _read_mapping(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: expected a mapping at the top level")
    return data


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kvcluster.deploy_config",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="merge, override, validate and write a cluster file")
    render.add_argument("base", nargs="?", default=None, help="base cluster YAML (default: defaults)")
    render.add_argument("--merge", action="append", default=[], metavar="FILE",
                        help="partial cluster YAML deep-merged over the base (repeatable)")
    render.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted field override, value parsed as YAML (repeatable)")
    render.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        config = render_config(args.base, args.merge, args.set)
    except (ConfigError, OSError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    if args.output == "-":
        sys.stdout.write(dump_config(config))
    else:
        write_config(config, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
