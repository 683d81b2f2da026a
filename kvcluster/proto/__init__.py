"""Generated gRPC stubs (``kvcluster.proto.kvcluster.v1``) and their one conversion module.

Regenerate with ``python -m kvcluster.proto.generate`` after editing ``protos/``.
"""
