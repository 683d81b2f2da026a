"""Adapters that put kvcluster under other serving engines (vLLM: ``integrations.vllm``).

Each adapter is a worker-side package: it may import kvcluster's foundation, kvstore and
the engine it adapts, never the router or the composition layer (pyproject's contracts).
"""
