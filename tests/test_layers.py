"""The layers of STYLE.md, as import-linter contracts (pyproject.toml [tool.importlinter]).

A wrong import (the foundation reaching into kvstore, the router importing torch, a
worker importing the composition layer) fails here instead of in a review.
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency (pyproject.toml [test])"
    return subprocess.run([exe, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_layer_contracts_hold():
    done = _lint_imports()
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_a_wrong_import_breaks_a_contract(tmp_path):
    """The contracts bite: a foundation module importing the router is reported."""
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["kvcluster", "router"]\n'
                      '[[tool.importlinter.contracts]]\nname = "probe"\ntype = "forbidden"\n'
                      'source_modules = ["kvcluster.worker"]\nforbidden_modules = ["router"]\n')
    done = _lint_imports("--config", str(config))
    assert done.returncode != 0
    assert "kvcluster.worker.node -> router" in done.stdout
