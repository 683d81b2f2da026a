"""kvcluster: a disaggregated, distributed KV-cache cluster for LLM serving."""

__version__ = "0.1.0"
