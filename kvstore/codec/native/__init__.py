"""C kernels of the level codecs, compiled once per machine (see :mod:`kvcluster.native`).

Each kernel has a torch/numpy twin that gives the same bytes and tensors; the
twins run when no compiler is available, off x86-64, or with the switch
below set to 0.
"""

DISABLE_ENV = "KVSTORE_CODEC_NATIVE"
"""``KVSTORE_CODEC_NATIVE=0`` keeps every codec kernel unloaded (the twins run)."""


def load_all() -> bool:
    """Compile (once per machine) and load every codec kernel now, rather than on the
    first chunk a worker encodes (a compile takes seconds); True if all loaded."""
    from kvstore.codec.native import packing_lib, planes_lib

    return planes_lib.available() and packing_lib.available()
