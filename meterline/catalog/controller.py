"""The catalog's HTTP routes: prices in force, every version, adding a version.

The handlers are thin: the body and parameters arrive checked
(:mod:`.schemas`), :class:`~meterline.catalog.PriceBook` is injected by
name, and its blocking warehouse calls run in a worker thread. A price the
domain refuses (:func:`~meterline.catalog.parse_price` raises ``ValueError``)
is answered 400 by the application's exception handlers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.params import JSONBody, QueryParameter, SkipValidation
from litestar.status_codes import HTTP_201_CREATED

from meterline.accounts.http import ACCESS_ERRORS, KEY_REQUIRED, admin_only, any_key
from meterline.catalog.book import PriceBook
from meterline.catalog.catalog import model_key, parse_price
from meterline.catalog.pricing import PriceVersion
from meterline.catalog.schemas import (
    MAX_NAME_LENGTH,
    AddedPriceVersion,
    PriceIn,
    PriceVersionOut,
    instant_parameter,
)

__all__ = ["CatalogController"]

#: What each route can answer besides success (documented in the OpenAPI).
_ERRORS = [*ACCESS_ERRORS, ValidationException, ServiceUnavailableException]

ModelFilter = Annotated[
    str | None,
    QueryParameter(
        description="Only this model; matched as the pipeline matches it "
        '("openai/gpt-4.1-mini" finds "gpt-4.1-mini").',
        max_length=MAX_NAME_LENGTH,
    ),
]
ProviderFilter = Annotated[
    str | None, QueryParameter(description="Only this provider.", max_length=MAX_NAME_LENGTH)
]


class CatalogController(Controller):
    """Effective-dated prices per (model, provider)."""

    path = "/v1/catalog"
    tags = ("catalog",)
    security = KEY_REQUIRED

    @get("/prices", summary="Prices in force", guards=[any_key], raises=_ERRORS)
    async def current_prices(
        self,
        price_book: NamedDependency[SkipValidation[PriceBook]],
        at: Annotated[
            str | None,
            QueryParameter(
                description="Instant, ISO 8601 (default: now).", format="date-time", max_length=64
            ),
        ] = None,
        model: ModelFilter = None,
        provider: ProviderFilter = None,
    ) -> list[PriceVersionOut]:
        """One price per (model, provider): the version in force at ``at``."""
        moment = datetime.now(UTC) if at is None else instant_parameter("at", at)
        catalog = await asyncio.to_thread(price_book.load)
        versions = _matching(catalog.current(moment), model, provider)
        return [PriceVersionOut.of(v) for v in versions]

    @get("/versions", summary="Every price version", guards=[any_key], raises=_ERRORS)
    async def price_versions(
        self,
        price_book: NamedDependency[SkipValidation[PriceBook]],
        model: ModelFilter = None,
        provider: ProviderFilter = None,
    ) -> list[PriceVersionOut]:
        """All versions, oldest first per (model, provider): the catalog's history."""
        catalog = await asyncio.to_thread(price_book.load)
        return [PriceVersionOut.of(v) for v in _matching(catalog.versions, model, provider)]

    @post(
        "/prices",
        summary="Add a price version",
        guards=[admin_only],
        status_code=HTTP_201_CREATED,
        raises=_ERRORS,
    )
    async def add_price(
        self, price_book: NamedDependency[SkipValidation[PriceBook]], data: JSONBody[PriceIn]
    ) -> AddedPriceVersion:
        """Add a version; it prices events from its ``effective_from`` on.

        Rates are decimal strings in dollars per million tokens, e.g.
        ``{"model": "gpt-4.1-mini", "provider": "openai", "effective_from":
        "2026-12-01T00:00:00Z", "rates": {"input": "0.40", "output": "1.60",
        "cache_read": "0.10"}}``. Events already priced keep their price;
        posting the same version again changes nothing (``created`` is false).
        """
        version = parse_price(data.as_mapping(), source="api")
        added = await asyncio.to_thread(price_book.add, [version])
        return AddedPriceVersion.of(version, created=bool(added))


def _matching(
    versions: list[PriceVersion], model: str | None, provider: str | None
) -> list[PriceVersion]:
    return [
        v
        for v in versions
        if (model is None or model_key(v.model) == model_key(model))
        and (provider is None or v.provider == provider.lower())
    ]
