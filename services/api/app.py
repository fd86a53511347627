"""The HTTP API (Litestar): usage and cost, the catalog, health, metrics.

Handlers are thin: they parse the request, call the domain code in a worker
thread (warehouse calls block) and shape the answer. Money is always a
decimal string. Errors are JSON ``{"status_code", "detail"}``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, cast

from litestar import Litestar, MediaType, Request, Response, get, post
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_503_SERVICE_UNAVAILABLE

from meterline.catalog import PriceBook, model_key, parse_price
from meterline.catalog.pricing import PriceVersion
from meterline.lib.warehouse.base import Warehouse, WarehouseError
from meterline.money import MoneyError
from meterline.usage.report import DIMENSIONS, Dimension, month_start, usage_report

#: Returns pipeline counters for /metrics, when a pipeline runs in this process.
MetricsSource = Callable[[], Mapping[str, float]]


def _utc(value: datetime | None, default: datetime) -> datetime:
    if value is None:
        return default
    return value if value.tzinfo else value.replace(tzinfo=UTC)


@get("/v1/accounts/{account_id:str}/usage", summary="Usage and cost of an account")
async def account_usage(
    state: State,
    account_id: FromPath[str],
    start: Annotated[
        datetime | None,
        QueryParameter(
            name="from", description="Start, inclusive (ISO 8601). Default: month start."
        ),
    ] = None,
    end: Annotated[
        datetime | None,
        QueryParameter(name="to", description="End, exclusive (ISO 8601). Default: now."),
    ] = None,
    group_by: Annotated[
        list[str] | None,
        QueryParameter(description="Any of model, provider, day; repeat or comma-separate."),
    ] = None,
) -> dict[str, object]:
    """Requests, token counts and ``cost_usd`` for the range, in total and per group."""
    now = datetime.now(UTC)
    dims = [d.strip() for value in group_by or () for d in value.split(",") if d.strip()]
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise ValueError(
            f"cannot group by {', '.join(unknown)}; choose from {', '.join(DIMENSIONS)}"
        )
    report = await asyncio.to_thread(
        usage_report,
        state.warehouse,
        account_id,
        _utc(start, month_start(now)),
        _utc(end, now),
        cast(list[Dimension], dims),
    )
    return report.to_json()


def _version_json(version: PriceVersion) -> dict[str, object]:
    return {
        "price_id": version.price_id,
        "model": version.model,
        "provider": version.provider,
        "effective_from": version.effective_from.isoformat(),
        "source": version.source,
        **version.spec_json(),
    }


@get("/v1/catalog/prices", summary="Prices in force")
async def current_prices(
    state: State,
    at: Annotated[datetime | None, QueryParameter(description="Instant (default now).")] = None,
    model: FromQuery[str | None] = None,
    provider: FromQuery[str | None] = None,
) -> list[dict[str, object]]:
    """One price per (model, provider): the version in force at ``at``."""
    catalog = await asyncio.to_thread(PriceBook(state.warehouse).load)
    versions = catalog.current(_utc(at, datetime.now(UTC)))
    return [_version_json(v) for v in _matching(versions, model, provider)]


@get("/v1/catalog/versions", summary="Every price version")
async def price_versions(
    state: State, model: FromQuery[str | None] = None, provider: FromQuery[str | None] = None
) -> list[dict[str, object]]:
    """All versions, oldest first per (model, provider): the catalog's history."""
    catalog = await asyncio.to_thread(PriceBook(state.warehouse).load)
    return [_version_json(v) for v in _matching(catalog.versions, model, provider)]


def _matching(
    versions: list[PriceVersion], model: str | None, provider: str | None
) -> list[PriceVersion]:
    return [
        v
        for v in versions
        if (model is None or model_key(v.model) == model_key(model))
        and (provider is None or v.provider == provider.lower())
    ]


@post("/v1/catalog/prices", summary="Add a price version", status_code=HTTP_201_CREATED)
async def add_price(state: State, data: JSONBody[dict[str, Any]]) -> dict[str, object]:
    """Add a version; it prices events from its ``effective_from`` on.

    Rates are decimal strings in dollars per million tokens, e.g.
    ``{"model": "gpt-4.1-mini", "provider": "openai", "effective_from":
    "2026-12-01T00:00:00Z", "rates": {"input": "0.40", "output": "1.60",
    "cache_read": "0.10"}}``. Events already priced keep their price.
    """
    try:
        version = parse_price(data, source=str(data.get("source") or "api"))
    except (ValueError, MoneyError, TypeError) as exc:
        raise ValueError(f"invalid price: {exc}") from exc
    added = await asyncio.to_thread(PriceBook(state.warehouse).add, [version])
    return {**_version_json(version), "created": bool(added)}


@get("/healthz", summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", summary="Readiness: the warehouse answers")
async def readyz(state: State) -> Response[dict[str, str]]:
    try:
        await asyncio.to_thread(state.warehouse.query, "SELECT 1 AS ok")
    except WarehouseError as exc:
        return Response(
            {"status": "unavailable", "detail": str(exc)}, status_code=HTTP_503_SERVICE_UNAVAILABLE
        )
    return Response({"status": "ready", "warehouse": state.warehouse.name})


@get("/metrics", media_type=MediaType.TEXT, summary="Prometheus metrics")
async def prometheus_metrics(state: State) -> str:
    source: MetricsSource | None = state.get("metrics")
    lines = []
    for name, value in (source() if source else {}).items():
        lines.append(f"meterline_pipeline_{name} {value}")
    return "\n".join(lines) + "\n"


@get("/", summary="Index")
async def index() -> dict[str, str]:
    return {
        "service": "meterline",
        "usage": "/v1/accounts/{account_id}/usage?from=...&to=...&group_by=model",
        "catalog": "/v1/catalog/prices",
        "openapi": "/schema",
    }


def _warehouse_unavailable(_: Request[Any, Any, Any], exc: WarehouseError) -> Response[Any]:
    return Response(
        {"status_code": 503, "detail": f"warehouse unavailable: {exc}"},
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
    )


def _bad_request(_: Request[Any, Any, Any], exc: ValueError) -> Response[Any]:
    return Response({"status_code": 400, "detail": str(exc)}, status_code=400)


def create_app(warehouse: Warehouse, *, metrics: MetricsSource | None = None) -> Litestar:
    """The API over one warehouse; ``metrics`` exposes an in-process pipeline's counters."""
    return Litestar(
        route_handlers=[
            account_usage,
            current_prices,
            price_versions,
            add_price,
            healthz,
            readyz,
            prometheus_metrics,
            index,
        ],
        state=State({"warehouse": warehouse, "metrics": metrics}),
        exception_handlers={
            WarehouseError: _warehouse_unavailable,
            ValueError: _bad_request,
        },
        openapi_config=OpenAPIConfig(title="meterline", version="1.0.0"),
        logging_config=None,  # the process configures logging once (services.cli)
    )
