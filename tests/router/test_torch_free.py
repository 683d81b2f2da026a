"""The router must import and route with torch unavailable."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import sys

    class BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test")
            return None

    sys.meta_path.insert(0, BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("blocker failed")

    import importlib
    import pkgutil

    import router
    for module in pkgutil.walk_packages(router.__path__, "router."):
        importlib.import_module(module.name)  # every module of the package, not just core
    from kvcluster.common.config import RouterConfig
    from kvcluster.common.events import BlockStored, HashSettings, Tier
    from kvcluster.common.hashing import ExtraKeys

    settings = HashSettings("m", 4, 4)
    r = router.Router(RouterConfig(), settings)
    r.registry.register("w")
    pub = router.KVEventPublisher("w", settings, r.bus)
    req = router.RouteRequest.from_tokens(list(range(10)), settings, ExtraKeys("m"))
    pub.announce()
    pub.on_event(BlockStored(tuple(req.block_hashes), Tier.DEVICE))
    pub.flush()
    r.pump_events()
    d = r.route(req)
    assert (d.instance_id, d.matched_blocks, d.matched_tokens) == ("w", 2, 8), d
    assert "torch" not in sys.modules
    print("ok")
""")


def test_router_runs_without_torch():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
