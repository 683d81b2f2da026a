"""KV streaming between nodes over gRPC, with an SLO-adaptive bitrate.

Sender side: :class:`~kvcluster.transfer.sender.KVSender` picks a codec level
per chunk (:mod:`.policy`, :mod:`.adaptive_policy`) from a bandwidth estimate
(:mod:`.bandwidth`). Receiver side: :class:`~kvcluster.transfer.receiver.KVReceiver`
decodes chunk i while chunk i+1 is on the wire and writes into a
:class:`~kvcluster.transfer.sink.KVSink`. See docs/transfer.md.
"""
