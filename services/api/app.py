"""The HTTP API (Litestar): the slices' controllers, composed, plus health and metrics.

Each slice keeps its routes beside it (:mod:`meterline.usage.controller`,
:mod:`meterline.catalog.controller`, :mod:`meterline.accounts.controller`,
:mod:`meterline.quotas.controller`); this module wires them to one warehouse,
one accounts store and, when given, one plan store:
dependencies by name, one exception-handler table, request metrics,
authentication (:mod:`meterline.accounts.http`), ``/healthz``, ``/readyz``
and ``/metrics``. Every route needs an API key except those, ``/`` and the
OpenAPI.

Every error is JSON ``{"status_code", "detail", "extra"?}``. A request that
does not fit its schema is a 400 whose ``detail`` names each field
(``rates.input: ...; tiers[0].above_input_tokens: ...``) and whose
``extra`` lists them as ``{"key", "message", "source"}``; a value the
domain refuses (``ValueError``) is a 400 with the domain's message; no
valid key is a 401, a key that may not is a 403; a missing account, key or
plan is a 404, an account that exists already a 409; a warehouse or an accounts
store that does not answer is a 503; anything else is a 500, logged with
its traceback.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, cast

import msgspec
import pydantic
from litestar import Litestar, MediaType, Request, Response, Router, get
from litestar.di import NamedDependency, Provide
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.middleware import ASGIMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.params import ParameterKwarg, SkipValidation
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_409_CONFLICT,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client import generate_latest as prometheus_text
from pydantic import BaseModel

from meterline.accounts import AccountExists, AccountNotFound, Authenticator, KeyNotFound
from meterline.accounts.controller import AccountController, KeyController
from meterline.accounts.http import BEARER_COMPONENTS, OPEN, BearerAuthentication
from meterline.accounts.manage import Accounts
from meterline.alerts.controller import AlertBook, AlertsController
from meterline.alerts.postgres import RuleNotFound
from meterline.catalog import PriceBook
from meterline.catalog.controller import CatalogController
from meterline.credits.controller import CreditsController
from meterline.credits.postgres import IdempotencyConflict, PostgresLedger
from meterline.lib.postgres import PostgresError
from meterline.lib.settings import HttpSettings
from meterline.lib.warehouse.base import Warehouse, WarehouseError, answers
from meterline.quotas.controller import (
    AccountPlanController,
    AccountQuotaController,
    PlanController,
)
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.store import PlanNotFound, PlanStore
from meterline.usage.controller import UsageController, UsageQuery
from meterline.usage.report import usage_report

__all__ = ["WarehouseUnavailable", "create_app"]

log = logging.getLogger(__name__)

#: Field problems listed in one error; a body with thousands of mistakes gets the first ones.
_MAX_PROBLEMS = 20


class WarehouseUnavailable(WarehouseError):
    """The warehouse does not answer at all, as opposed to refusing one statement."""


class _OutageAware:
    """The warehouse, telling an outage from a refused statement.

    After a failure it asks ``SELECT 1``: if that fails too the warehouse is
    down (:class:`WarehouseUnavailable`, a 503 worth retrying); if not, the
    statement itself was refused, which is a bug to fix (a 500, logged). Every
    method of the :class:`Warehouse` is passed through this way, whatever the
    protocol grows.
    """

    def __init__(self, warehouse: Warehouse) -> None:
        self._warehouse = warehouse

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._warehouse, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def classified(*args: Any, **kwargs: Any) -> Any:
            try:
                return attribute(*args, **kwargs)
            except WarehouseUnavailable:
                raise
            except WarehouseError as refused:
                if not answers(self._warehouse):
                    raise WarehouseUnavailable(str(refused)) from refused
                raise

        return classified


class _ApiRequest(Request[Any, Any, Any]):
    """A request whose JSON body, when it cannot be read, is the client's error (400)."""

    async def json(self) -> Any:
        try:
            return await super().json()
        except RecursionError:  # e.g. 10,000 nested arrays: refused before any schema sees it
            raise _body_error("JSON nested too deeply") from None
        except SerializationException as exc:
            raise _body_error(f"not valid JSON ({exc})") from None


def _body_error(message: str) -> ValidationException:
    return ValidationException(
        f"body: {message}", extra=[{"key": "body", "message": message, "source": "body"}]
    )


class FieldProblem(BaseModel):
    """One field of a request that does not fit its schema."""

    key: str
    message: str
    source: str | None = None


class ErrorBody(BaseModel):
    """Every error answer; ``extra`` lists field problems of a 400."""

    status_code: int
    detail: str
    extra: list[FieldProblem] | None = None


def _error(
    status: int,
    detail: str,
    problems: list[FieldProblem] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[dict[str, Any]]:
    body = ErrorBody(status_code=status, detail=detail, extra=problems or None)
    return Response(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _public_key(request: Request[Any, Any, Any], item: Mapping[str, Any]) -> FieldProblem:
    """A field as the client wrote it: ``from`` (not the handler's ``start``), ``tiers[0]``."""
    key = str(item.get("key") or "body")
    message = str(item.get("message", ""))
    source = item.get("source")
    parameters = request.route_handler.parsed_fn_signature.parameters
    root, _, rest = key.partition(".")
    kwarg = parameters[root].kwarg_definition if root in parameters else None
    if root == "data":  # Litestar's name for the body; it says "'data'" when there is none
        key, source = rest or "body", "body"
        message = "Field required" if message == "'data'" else message
    elif isinstance(kwarg, ParameterKwarg):  # a query, path, header or cookie parameter
        root = kwarg.name or kwarg.query or kwarg.header or kwarg.cookie or root
        key = f"{root}.{rest}" if rest else root
        source = kwarg.param_type.value
    elif not source:  # else the body's fields, named relative to the body
        source = "body"
    key = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", key)
    source = source.value if isinstance(source, Enum) else str(source)
    return FieldProblem(key=key, message=message, source=source)


def _invalid(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    items = exc.extra if isinstance(exc.extra, list) else []
    problems = [_public_key(request, i) for i in items[:_MAX_PROBLEMS] if isinstance(i, Mapping)]
    detail = exc.detail
    # Litestar's own detail names the route, not the fields; the raiser's own is kept
    if problems and detail.startswith("Validation failed for "):
        detail = "; ".join(f"{p.key}: {p.message}" for p in problems)
        if len(items) > len(problems):
            detail += f"; and {len(items) - len(problems)} more"
    return _error(HTTP_400_BAD_REQUEST, detail, problems)


def _refused(_: Request[Any, Any, Any], exc: ValueError) -> Response[Any]:
    """The domain refused a value (a price, a range): the client can fix it."""
    return _error(HTTP_400_BAD_REQUEST, str(exc))


def _unavailable(request: Request[Any, Any, Any], exc: WarehouseUnavailable) -> Response[Any]:
    log.warning("%s %s: warehouse unavailable: %s", request.method, request.url.path, exc)
    return _error(HTTP_503_SERVICE_UNAVAILABLE, "warehouse unavailable")


def _store_unavailable(request: Request[Any, Any, Any], exc: PostgresError) -> Response[Any]:
    log.warning("%s %s: account store unavailable: %s", request.method, request.url.path, exc)
    return _error(HTTP_503_SERVICE_UNAVAILABLE, "account store unavailable")


def _not_found(_: Request[Any, Any, Any], exc: LookupError) -> Response[Any]:
    """An account, key or plan that is not there (only keys that may see it get this far)."""
    return _error(HTTP_404_NOT_FOUND, str(exc))


def _conflict(_: Request[Any, Any, Any], exc: ValueError) -> Response[Any]:
    return _error(HTTP_409_CONFLICT, str(exc))


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    """Litestar's own answers (404, 405, ...) in the same shape as ours."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    problems = [FieldProblem.model_validate(i) for i in extra if isinstance(i, Mapping)]
    return _error(exc.status_code, exc.detail, problems, headers=exc.headers)


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(HTTP_500_INTERNAL_SERVER_ERROR, "Internal Server Error")


#: By type, most specific first in each exception's MRO; 500 is for everything else.
EXCEPTION_HANDLERS: Mapping[int | type[Exception], Callable[..., Response[Any]]] = {
    ValidationException: _invalid,
    HTTPException: _http_error,  # before ValueError: NotFoundException is one too
    WarehouseUnavailable: _unavailable,
    PostgresError: _store_unavailable,
    AccountNotFound: _not_found,
    KeyNotFound: _not_found,
    PlanNotFound: _not_found,
    RuleNotFound: _not_found,
    AccountExists: _conflict,  # a ValueError too: the nearest entry in its MRO wins
    IdempotencyConflict: _conflict,
    # a schema failing inside our own code is a bug, not the client's mistake
    pydantic.ValidationError: _internal_error,
    msgspec.ValidationError: _internal_error,
    ValueError: _refused,  # MoneyError included
    HTTP_500_INTERNAL_SERVER_ERROR: _internal_error,
}


class _RequestMetrics(ASGIMiddleware):
    """Counts requests by route template, method and status, and times them by route."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "meterline_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "meterline_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template.",
            ["route"],
            registry=registry,
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        status = HTTP_500_INTERNAL_SERVER_ERROR  # unless the answer says otherwise
        started = time.perf_counter()

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await next_app(scope, receive, send_and_note)
        except HTTPException as exc:  # raised by a middleware inside; answered outside
            status = exc.status_code
            raise
        finally:
            route = scope.get("path_template") or "unmatched"
            self.duration.labels(route).observe(time.perf_counter() - started)
            method = cast(HTTPScope, scope)["method"]
            self.requests.labels(route, method, str(status)).inc()


@get("/healthz", summary="Liveness", tags=["operations"], exclude_from_auth=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    summary="Readiness: the warehouse and the account store answer",
    tags=["operations"],
    exclude_from_auth=True,
)
async def readyz(
    warehouse: NamedDependency[SkipValidation[Warehouse]],
    accounts: NamedDependency[SkipValidation[Accounts]],
) -> Response[dict[str, str]]:
    try:
        await asyncio.to_thread(warehouse.query, "SELECT 1 AS ok")
    except WarehouseError as exc:
        return Response(
            {"status": "unavailable", "detail": str(exc)}, status_code=HTTP_503_SERVICE_UNAVAILABLE
        )
    if not await asyncio.to_thread(accounts.store.answers):
        return Response(
            {"status": "unavailable", "detail": "the account store (PostgreSQL) does not answer"},
            status_code=HTTP_503_SERVICE_UNAVAILABLE,
        )
    return Response({"status": "ready", "warehouse": warehouse.name})


#: Prometheus' text format without its charset: Litestar appends one to every text/* type.
_PROMETHEUS_TEXT = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")


@get(
    "/metrics",
    summary="Prometheus metrics",
    tags=["operations"],
    media_type=MediaType.TEXT,
    exclude_from_auth=True,
)
async def prometheus_metrics(
    registry: NamedDependency[SkipValidation[CollectorRegistry]],
) -> Response[bytes]:
    return Response(prometheus_text(registry), media_type=_PROMETHEUS_TEXT)


@get("/", summary="Index", tags=["operations"], exclude_from_auth=True)
async def index() -> dict[str, str]:
    return {
        "service": "meterline",
        "usage": "/v1/accounts/{account_id}/usage?from=...&to=...&group_by=model",
        "catalog": "/v1/catalog/prices",
        "accounts": "/v1/accounts",
        "keys": "/v1/keys",
        "openapi": "/schema",
    }


def _constant(value: object) -> Provide:
    """A dependency that is the same object for every request."""
    return Provide(lambda: value, use_cache=True, sync_to_thread=False)


def create_app(
    warehouse: Warehouse,
    *,
    auth: Authenticator,
    accounts: Accounts,
    plans: PlanStore | None = None,
    quotas: QuotaDesk | None = None,
    ledger: PostgresLedger | None = None,
    alerts: AlertBook | None = None,
    registry: CollectorRegistry | None = None,
    settings: HttpSettings | None = None,
) -> Litestar:
    """The API over one warehouse and one accounts store.

    Args:
        warehouse: Where usage and prices are read and written.
        auth: Who presents a key: the process's
            :class:`~meterline.accounts.KeyRing`, or
            :class:`~meterline.accounts.OpenDoor` with authentication off.
        accounts: Accounts and keys, managed under ``/v1/accounts`` and
            ``/v1/keys``; keys it issues or revokes take effect in ``auth``
            at once when it holds the same ring.
        plans: Plan versions and the accounts' assignments, under ``/v1/plans``
            and ``/v1/accounts/{account_id}/plan``; without it those routes
            are not mounted.
        quotas: What each account has used of its plan's limits, served at
            ``/v1/accounts/{account_id}/quota``; without it that route is not mounted.
        ledger: Prepaid credits, under ``/v1/accounts/{account_id}/grants``,
            ``/balance``, ``/ledger`` and ``/adjustments``; needs ``plans`` too (the
            ledger check reads which plans are prepaid).
        alerts: Alert rules, the webhook and the alerts fired, under
            ``/v1/accounts/{account_id}/alerts``.
        registry: Where the API counts its requests, served at ``/metrics`` with
            whatever else the process registered there. Default: a new one.
        settings: The process's HTTP settings; default: the defaults.
    """
    metrics_public = True if settings is None else settings.metrics_public
    registry = registry if registry is not None else CollectorRegistry()
    store = cast(Warehouse, _OutageAware(warehouse))
    usage_query: UsageQuery = functools.partial(usage_report, store)
    handlers: list[Any] = [
        UsageController,
        CatalogController,
        AccountController,
        KeyController,
        healthz,
        readyz,
        index,
    ]
    dependencies = {
        "warehouse": _constant(store),
        "price_book": _constant(PriceBook(store)),
        "usage_query": _constant(usage_query),
        "registry": _constant(registry),
        "accounts": _constant(accounts),
    }
    if plans is not None:
        handlers += [PlanController, AccountPlanController]
        dependencies["plans"] = _constant(plans)
    if ledger is not None and plans is not None:
        handlers.append(CreditsController)
        dependencies["ledger"] = _constant(ledger)
        dependencies["credit_gate"] = _constant(quotas)
    if alerts is not None:
        handlers.append(AlertsController)
        dependencies["alerts"] = _constant(alerts)
    if quotas is not None:
        handlers.append(AccountQuotaController)
        dependencies["quotas"] = _constant(quotas)
    if metrics_public:
        handlers.append(prometheus_metrics)
    return Litestar(
        route_handlers=handlers,
        dependencies=dependencies,
        exception_handlers=dict(EXCEPTION_HANDLERS),
        # outermost first: a request refused for its key is counted too
        middleware=[_RequestMetrics(registry), BearerAuthentication(auth)],
        request_class=_ApiRequest,
        openapi_config=OpenAPIConfig(
            title="meterline",
            version="1.0.0",
            components=BEARER_COMPONENTS,
            # the schema is public, as the operations routes are
            openapi_router=Router("/schema", route_handlers=[], opt={OPEN: True}),
        ),
        logging_config=None,  # the process configures logging once (services.cli)
    )
