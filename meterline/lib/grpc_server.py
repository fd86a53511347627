"""A gRPC service's server: health checks, reflection, its port, a graceful stop.

Ingest and quotas each run one (``services/ingest``, ``services/quota``), built alike:
the service registered on a ``grpc.aio`` server with its interceptors, then handed
here, which adds ``grpc.health.v1`` (SERVING once started, NOT_SERVING while it
stops, for load balancers) and reflection (for grpcurl), and listens.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

__all__ = ["ServiceServer"]

log = logging.getLogger(__name__)


class ServiceServer:
    """``server``, serving ``service`` (its full name) on ``host:port`` (0: any free)."""

    def __init__(
        self,
        server: grpc.aio.Server,
        service: str,
        *,
        host: str,
        port: int,
        grace_s: float,
        label: str,
    ) -> None:
        self.server = server
        self.service = service
        self.host = host
        self.grace_s = grace_s
        self.label = label
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (service, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        self.port = server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {host}:{port}")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        for name in ("", self.service):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("%s gRPC on %s", self.label, self.address)

    async def stop(self) -> None:
        """Stop taking RPCs, let those in flight finish (``grace_s``), report NOT_SERVING."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_s)
