"""The `kvcluster` command: each subcommand lives in the module that does the work."""

from __future__ import annotations

import argparse
import sys

from kvcluster.common.config import ENGINE_KINDS


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcluster", description=__doc__)
    sub = parser.add_subparsers()

    demo = sub.add_parser("demo", help="run the demo workload on the embedded default")
    demo.add_argument("--model", default="smollm2", help="HF folder, .gguf file or 'smollm2'")
    demo.add_argument("--engine", default="native", choices=ENGINE_KINDS,
                      help="the workers' engine (engine.kind); docs/benchmarks.md compares them")
    demo.set_defaults(func=_demo)

    model = sub.add_parser("model", help="model utilities").add_subparsers()
    tiny = model.add_parser("init-tiny", help="write a tiny random Llama model (HF format)")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", default="llama", choices=["llama", "llama3", "qwen2"])
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_init_tiny)

    serve = sub.add_parser("serve", help="start the whole system from one config file")
    serve.add_argument("--config", default="", help="cluster YAML (default: built-in defaults)")
    serve.add_argument("--ray-address", default="", help="join this Ray cluster (default: local)")
    serve.set_defaults(func=_serve)

    pools = sub.add_parser("pools", help="the worker pools (Ray actors)").add_subparsers()
    stop = pools.add_parser("stop", help="kill the pools' actors (detached ones outlive serve)")
    stop.add_argument("--config", default="", help="cluster YAML the pools were started with")
    stop.add_argument("--ray-address", default="auto")
    stop.set_defaults(func=_pools_stop)

    status = sub.add_parser("status", help="print the cluster: instances, health, tiers")
    status.add_argument("--ray-address", default="auto")
    status.set_defaults(func=_status)

    config = sub.add_parser("config", help="configuration").add_subparsers()
    check = config.add_parser("check", help="validate a cluster YAML file")
    check.add_argument("file")
    check.set_defaults(func=_config_check)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from kvcluster.demo import run_demo

    return run_demo(model=args.model, engine=args.engine)


def _serve(args: argparse.Namespace) -> int:
    from kvcluster.runtime.serve import serve_forever

    return serve_forever(args.config, args.ray_address)


def _pools_stop(args: argparse.Namespace) -> int:
    import os

    from kvcluster.common.config import ClusterConfig, load_config
    from kvcluster.runtime.pools import init_local_ray, stop_pools

    os.environ["RAY_ADDRESS"] = args.ray_address
    init_local_ray()
    config = load_config(args.config) if args.config else ClusterConfig()
    print(f"stopped {stop_pools(config)} actors")
    return 0


def _status(args: argparse.Namespace) -> int:
    from kvcluster.runtime.status import print_status

    return print_status(args.ray_address)


def _init_tiny(args: argparse.Namespace) -> int:
    from kvcluster.engine.tiny import write_tiny_model

    path = write_tiny_model(args.dir, arch=args.arch, seed=args.seed)
    print(f"wrote tiny {args.arch} model to {path}")
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from kvcluster.common.config import ConfigError, load_config

    try:
        load_config(args.file)
    except (ConfigError, OSError) as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok")
    return 0
