"""keep_heap_warm: a freed message-sized buffer stays in the heap for the next one."""

import platform
import subprocess
import sys

import pytest

from kvcluster.common.config import ConfigError, TransferConfig

PROBE = r"""
import ctypes, sys
from kvcluster.transfer.heap import keep_heap_warm

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "warm":
    assert keep_heap_warm(256 << 20)
message = bytes(8 << 20)          # one 8 MiB gRPC message's worth
mapped_separately = libc.mallinfo2().hblkhd >= 8 << 20
del message
print(int(mapped_separately), libc.mallinfo2().fordblks >> 20)
"""


def _probe(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc mallopt only")
def test_message_buffers_stay_in_the_heap_once_warm():
    mapped, _ = _probe("default")
    assert mapped  # glibc's default: its own mmap, unmapped (cold) on free
    mapped, free_mib = _probe("warm")
    assert not mapped and free_mib >= 8  # served from the heap and kept there when freed


def test_threshold_is_validated():
    with pytest.raises(ConfigError, match="heap_trim_threshold_bytes"):
        TransferConfig(heap_trim_threshold_bytes=-1).validate("transfer")
