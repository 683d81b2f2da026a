"""Data planes: chunk payload bytes beside the gRPC control stream (docs/transfer.md).

:mod:`.base` (the interface), one backend per file (:mod:`.grpc_inline`,
:mod:`.tcp` + :mod:`.tcp_link`, :mod:`.shm`, :mod:`.mooncake`), and
:mod:`.factory` (the offer, the grant, ``transfer.data_plane``).
"""
