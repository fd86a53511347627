"""Matching a (model, provider, time) to the price version in force.

:class:`Catalog` is the in-memory index the pipeline prices with; the price
versions themselves live in the warehouse table ``price_versions``, written
by :class:`PriceBook`. A version is never changed once written: a new price
is a new version with a later ``effective_from``, and events already priced
keep the ``price_id`` that priced them.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from importlib import resources
from typing import Any

from meterline.catalog.pricing import CompiledPrice, LongContextTier, PriceVersion, Rates

_DATE_SUFFIX = re.compile(r"-(\d{8}|\d{4}-\d{2}-\d{2})$")


@lru_cache(maxsize=4096)
def model_key(model: str) -> str:
    """Matching key: no vendor prefix, lower case, dots as dashes.

    "openai/gpt-4.1-mini", "gpt-4.1-mini" and "GPT-4-1-mini" share one key, so
    do "claude-sonnet-4.5" and "anthropic/claude-sonnet-4-5".
    """
    return model.rsplit("/", 1)[-1].strip().lower().replace(".", "-")


def _undated(key: str) -> str:
    """ "gpt-4-1-mini-2025-04-14" -> "gpt-4-1-mini": dated snapshots share a price."""
    return _DATE_SUFFIX.sub("", key)


class Catalog:
    """Price lookup by (model, provider, time), over compiled integer rates."""

    def __init__(self, versions: Iterable[PriceVersion]) -> None:
        self.versions = sorted(
            versions, key=lambda v: (model_key(v.model), v.provider, v.effective_from)
        )
        grouped: dict[tuple[str, str], list[PriceVersion]] = {}
        for version in self.versions:
            key = (model_key(version.model), version.provider.lower())
            grouped.setdefault(key, []).append(version)
        self._index: dict[tuple[str, str], tuple[list[datetime], list[CompiledPrice]]] = {
            key: ([v.effective_from for v in vs], [v.compile() for v in vs])
            for key, vs in grouped.items()
        }
        self._resolved: dict[tuple[str, str], tuple[str, str] | None] = {}

    def __len__(self) -> int:
        return len(self.versions)

    def _resolve(self, model: str, provider: str) -> tuple[str, str] | None:
        try:
            return self._resolved[(model, provider)]
        except KeyError:
            pass
        key = model_key(model)
        prov = provider.lower()
        found = next(
            (k for k in ((key, prov), (_undated(key), prov)) if k in self._index),
            None,
        )
        self._resolved[(model, provider)] = found
        return found

    def price_for(self, model: str, provider: str, at: datetime) -> CompiledPrice | None:
        """The price in force for this model and provider at ``at``, if any."""
        key = self._resolve(model, provider)
        if key is None:
            return None
        starts, prices = self._index[key]
        i = bisect.bisect_right(starts, at) - 1
        return prices[i] if i >= 0 else None

    def schedule(self, model: str, provider: str) -> list[tuple[datetime, CompiledPrice]]:
        """Every price this model and provider has, by start: what ``price_for`` picks from.

        Of versions starting at the same moment only the one ``price_for``
        would pick is kept, so a lookup in the list needs no tie-break.
        """
        key = self._resolve(model, provider)
        if key is None:
            return []
        starts, prices = self._index[key]
        return [
            (start, price)
            for i, (start, price) in enumerate(zip(starts, prices, strict=True))
            if i + 1 == len(starts) or starts[i + 1] != start
        ]

    def current(self, at: datetime | None = None) -> list[PriceVersion]:
        """One version per (model, provider): the one in force at ``at`` (default now)."""
        at = at or datetime.now(UTC)
        latest: dict[tuple[str, str], PriceVersion] = {}
        for version in self.versions:
            if version.effective_from <= at:
                latest[(model_key(version.model), version.provider)] = version
        return list(latest.values())


def _parse_time(value: str | datetime) -> datetime:
    if isinstance(value, datetime):
        moment = value
    else:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_price(data: Mapping[str, Any], *, source: str = "manual") -> PriceVersion:
    """A price version from its JSON form; raises ValueError with the reason."""
    try:
        model = str(data["model"]).strip()
        provider = str(data["provider"]).strip().lower()
        effective_from = _parse_time(data["effective_from"])
        rates = Rates.from_json(data["rates"])
    except KeyError as exc:
        raise ValueError(f"price is missing {exc.args[0]!r}") from exc
    if not model or not provider:
        raise ValueError("price needs a model and a provider")
    tiers = tuple(
        LongContextTier(
            above_input_tokens=int(t["above_input_tokens"]),
            rates=Rates.from_json({**data["rates"], **t["rates"]}),
        )
        for t in data.get("tiers") or ()
    )
    return PriceVersion(
        model=model,
        provider=provider,
        effective_from=effective_from,
        rates=rates,
        tiers=tiers,
        source=str(data.get("source") or source),
    )


def seed_versions() -> list[PriceVersion]:
    """The catalog meterline ships with (``catalog/seed.json``)."""
    seed = json.loads(resources.files("meterline.catalog").joinpath("seed.json").read_text())
    return [
        parse_price(
            {**entry, "provider": provider, "effective_from": seed["effective_from"]},
            source=seed["source"],
        )
        for entry in seed["prices"]
        for provider in entry["providers"]
    ]
