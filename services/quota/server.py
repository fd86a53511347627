"""The quota gRPC service: gateways ask before each request they forward.

``CheckQuota`` answers allowed (and reserved) or denied with the limit that tripped,
``ReleaseQuota`` frees a reservation whose request never ran; the rules are the
engine's (:mod:`meterline.quotas.engine`) and what they need at hand is the desk's
(:mod:`meterline.quotas.desk`). Admin and service keys may ask, each for the accounts
it may act for. A malformed request is refused INVALID_ARGUMENT naming its field;
PostgreSQL down with the account never seen is UNAVAILABLE (the gateway retries or
applies its own default). Redis down is an answer, not an error: allowed or denied as
``METERLINE_QUOTA_WHEN_REDIS_DOWN`` says, reason REDIS_UNAVAILABLE.
"""

from __future__ import annotations

import functools
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from meterline.accounts.auth import Authenticator
from meterline.accounts.grpc import AuthInterceptor, current_principal
from meterline.accounts.model import KeyKind, account_id_problem
from meterline.lib.grpc_server import ServiceServer
from meterline.lib.metrics import CollectorRegistry
from meterline.lib.settings import EventRules, QuotaSettings
from meterline.money import MAX_TOKEN_COUNT
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.engine import REASONS, Decision, QuotaRequest
from meterline.v1 import quota_pb2, quota_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
#: Who may ask: gateways (service keys) and admins.
CHECKERS = frozenset({KeyKind.ADMIN, KeyKind.SERVICE})
#: The engine's reason codes as the proto's enum.
DENY_REASONS = {name: quota_pb2.DenyReason.Value(f"DENY_REASON_{name.upper()}") for name in REASONS}

if TYPE_CHECKING:
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _Context = grpc.aio.ServicerContext


class QuotaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.checks = Counter(
            "meterline_quota_checks",
            "CheckQuota answers, by outcome (allowed, denied) and reason (the limit that "
            "tripped; none when allowed, redis_unavailable when Redis did not answer).",
            ("outcome", "reason"),
            registry=registry,
        )
        self.seconds = Histogram(
            "meterline_quota_check_seconds",
            "Time to answer a CheckQuota, in the server.",
            registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
        )


def _problem(request: quota_pb2.CheckQuotaRequest, rules: EventRules) -> str | None:
    """Why a check cannot be judged, naming the field; None when it can. Ids and names
    are bounded as the usage event that follows must be (``EventRules``)."""
    longest_id, longest_name = rules.max_id_length, rules.max_name_length
    if (problem := account_id_problem(request.account_id)) is not None:
        return problem
    for name, value, longest in (
        ("event_id", request.event_id, longest_id),
        ("model", request.model, longest_name),
    ):
        if not value.strip():
            return f"{name} is missing"
        if len(value) > longest:
            return f"{name} is longer than {longest} characters"
    if len(request.provider) > longest_name:
        return f"provider is longer than {longest_name} characters"
    if len(request.api_key_id) > longest_id:
        return f"api_key_id is longer than {longest_id} characters"
    for name in ("input_tokens", "max_output_tokens"):
        value = getattr(request, name)
        if not 0 <= value <= MAX_TOKEN_COUNT:
            return f"{name} is {value}: between 0 and {MAX_TOKEN_COUNT:,}"
    return None


@functools.lru_cache(maxsize=1024)
def _timestamp(at: datetime) -> Timestamp:
    """``at`` as a Timestamp; the same few window ends recur in every answer (a message
    field set from it takes a copy)."""
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp


def response_of(decision: Decision) -> quota_pb2.CheckQuotaResponse:
    """The engine's decision as the proto says it."""
    retry = Duration()
    if not decision.allowed:
        retry.FromNanoseconds(round(decision.retry_after_s * 1e9))
    credits = decision.credits
    return quota_pb2.CheckQuotaResponse(
        allowed=decision.allowed,
        reason=DENY_REASONS[decision.reason]
        if decision.reason
        else quota_pb2.DENY_REASON_UNSPECIFIED,
        message=decision.message,
        retry_after=retry,
        limits=[
            quota_pb2.LimitState(
                limit=s.limit,
                scope=s.scope,
                used=s.shown(s.used),
                limit_value=s.shown(s.cap),
                remaining=s.shown(s.remaining),
                resets_at=_timestamp(s.resets_at) if s.resets_at else None,
            )
            for s in decision.limits
        ],
        credits_available="" if credits is None else credits.shown(credits.remaining),
    )


class QuotaService(quota_pb2_grpc.QuotaServiceServicer):
    def __init__(self, desk: QuotaDesk, registry: CollectorRegistry, rules: EventRules) -> None:
        self.desk = desk
        self.rules = rules
        self.metrics = QuotaMetrics(registry)

    async def _may_act_for(self, account_id: str, context: _Context) -> None:
        if not current_principal().may_act_for(account_id):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"this key may not ask for account {account_id}",
            )

    async def CheckQuota(  # noqa: N802 - gRPC method name
        self, request: quota_pb2.CheckQuotaRequest, context: _Context
    ) -> quota_pb2.CheckQuotaResponse:
        started = time.perf_counter()
        if (problem := _problem(request, self.rules)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        await self._may_act_for(request.account_id, context)
        asked = QuotaRequest(
            account_id=request.account_id,
            api_key_id=request.api_key_id or None,
            model=request.model,
            provider=request.provider,
            input_tokens=request.input_tokens,
            max_output_tokens=request.max_output_tokens or None,
            event_id=request.event_id,
        )
        try:
            decision = await self.desk.check(asked)
        except Exception as exc:  # PostgreSQL or the warehouse did not answer
            log.warning("quotas: cannot check %s: %s", request.account_id, exc)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot read the account's plan or counters now ({exc!r}); retry",
            )
        self.metrics.checks.labels(
            "allowed" if decision.allowed else "denied", decision.reason or "none"
        ).inc()
        self.metrics.seconds.observe(time.perf_counter() - started)
        return response_of(decision)

    async def ReleaseQuota(  # noqa: N802 - gRPC method name
        self, request: quota_pb2.ReleaseQuotaRequest, context: _Context
    ) -> quota_pb2.ReleaseQuotaResponse:
        if (problem := account_id_problem(request.account_id)) is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if not request.event_id.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "event_id is missing")
        await self._may_act_for(request.account_id, context)
        try:
            released = await self.desk.release(request.account_id, request.event_id)
        except Exception as exc:  # Redis did not answer: the reservation expires anyway
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot release now ({exc!r}); retry, or it frees itself on expiry",
            )
        return quota_pb2.ReleaseQuotaResponse(released=released)


class QuotaServer:
    """The quota gRPC server, with health and reflection, and a graceful stop."""

    def __init__(
        self,
        desk: QuotaDesk,
        *,
        settings: QuotaSettings,
        auth: Authenticator,
        registry: CollectorRegistry | None = None,
        rules: EventRules | None = None,
    ) -> None:
        """``rules``: the bounds of ids and names (the events'; default: the defaults)."""
        self.settings = settings
        self.registry = registry if registry is not None else CollectorRegistry()
        self.server = grpc.aio.server(
            interceptors=[
                AuthInterceptor(auth, allowed={SERVICE_NAME: CHECKERS}, registry=self.registry)
            ],
        )
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(
            QuotaService(desk, self.registry, rules or EventRules()), self.server
        )
        self.served = ServiceServer(
            self.server,
            SERVICE_NAME,
            host=settings.host,
            port=settings.port,
            grace_s=2.0,
            label="quota",
        )

    @property
    def address(self) -> str:
        return self.served.address

    async def start(self) -> None:
        await self.served.start()

    async def stop(self) -> None:
        await self.served.stop()
