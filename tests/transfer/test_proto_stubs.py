"""The checked-in stubs are exactly what the generator makes from protos/, and they work
against our server (which uses its own serialisers)."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import grpc

from kvcluster.proto import generate
from kvcluster.proto.kvcluster.v1 import kv_transfer_pb2 as pb
from kvcluster.proto.kvcluster.v1 import kv_transfer_pb2_grpc as pb_grpc
from tests.transfer.conftest import make_runner, run, small_config
from tests.transfer.helpers import receiver_node


def test_stubs_match_the_protos(tmp_path):
    fresh = generate.generate(tmp_path)
    protos = generate.proto_files()
    assert len(fresh) == 3 * len(protos)  # _pb2.py, _pb2.pyi, _pb2_grpc.py per .proto
    for path in fresh:
        checked_in = generate.OUT_ROOT / path
        assert checked_in.exists(), f"missing stub {path}: run python -m kvcluster.proto.generate"
        assert filecmp.cmp(tmp_path / path, checked_in, shallow=False), \
            f"stale stub {path}: run python -m kvcluster.proto.generate"


def test_check_flag_detects_a_stale_stub(tmp_path):
    generate.generate(tmp_path)
    assert generate.check(tmp_path) == []
    victim = tmp_path / "kvcluster" / "v1" / "kv_transfer_pb2.py"
    victim.write_text(victim.read_text() + "\n# edited\n")
    assert generate.check(tmp_path) == ["kvcluster/v1/kv_transfer_pb2.py"]


def test_generated_imports_are_rewritten_to_our_package():
    grpc_stub = (generate.OUT_ROOT / "kvcluster/v1/kv_transfer_pb2_grpc.py").read_text()
    assert "from kvcluster.proto.kvcluster.v1 import kv_transfer_pb2" in grpc_stub
    assert "\nfrom kvcluster.v1 " not in grpc_stub


def test_the_command_line_check_passes():
    root = Path(generate.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "kvcluster.proto.generate", "--check"],
                          cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_generated_client_stub_talks_to_our_server(tiny_dir, levels):
    runner = make_runner(tiny_dir, num_blocks=8)

    async def main():
        async with receiver_node(runner, levels, small_config()) as node:
            async with grpc.aio.insecure_channel(node.server.address) as channel:
                return await pb_grpc.KVTransferStub(channel).GetReceiverInfo(
                    pb.ReceiverInfoRequest())

    info = run(main())
    assert list(info.layout_identities) == [runner.layout.identity]
    assert list(info.levels) == levels.names
