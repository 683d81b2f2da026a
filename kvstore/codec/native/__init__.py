"""C kernels of the level codecs, compiled once per machine (see :mod:`kvcluster.native`).

Each kernel has a torch/numpy twin that gives the same bytes and tensors; the
twins run when no compiler is available, off x86-64, or with the kernel's
environment switch set to 0.
"""
