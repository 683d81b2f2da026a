"""Metrics and logs: the foundation every layer may import (no kvstore, router or workers)."""
