"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), next to the gRPC service.

It serves from the same backends (``LocalBackend``, ``RayClusterBackend``) with
the same admission as gRPC (``frontend_input.admit_prompt``, the tenant rate
limiter, ``events.text_events``) and the same status table
(``kvcluster.server.status``). Start it with :func:`serve_http`.
"""

from kvcluster.server.http.server import HttpServer, serve_http

__all__ = ["HttpServer", "serve_http"]
