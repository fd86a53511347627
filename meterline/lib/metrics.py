"""Prometheus metrics: each process keeps its own registry and serves it.

A registry is made per process (or per test) and passed to the parts that
count, so two pipelines in one test process never share counters. A
standalone process serves its registry at ``/metrics`` on
``METERLINE_METRICS_HOST``:``METERLINE_METRICS_PORT``; ``meterline up``
serves one registry with every part's metrics from the HTTP API's ``/metrics``.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

__all__ = ["CollectorRegistry", "MetricsServer", "serve_metrics"]


class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
    """Serve ``registry`` in a background thread; port 0 picks a free one."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
