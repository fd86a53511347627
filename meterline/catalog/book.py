"""Price versions kept in the warehouse table ``price_versions``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

from meterline.catalog.catalog import Catalog, parse_price, seed_versions
from meterline.catalog.pricing import PriceVersion
from meterline.lib.warehouse.base import Warehouse


class PriceBook:
    """Price versions in the warehouse: load, add, seed."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse

    def load(self) -> Catalog:
        rows = self.warehouse.query(
            "SELECT price_id, model, provider, effective_from, source, spec_json "
            "FROM price_versions ORDER BY created_at"
        )
        by_id: dict[str, PriceVersion] = {}
        for row in rows:
            spec = json.loads(row["spec_json"])
            version = parse_price(
                {
                    "model": row["model"],
                    "provider": row["provider"],
                    "effective_from": row["effective_from"],
                    "rates": spec["rates"],
                    "tiers": spec["tiers"],
                    "source": row["source"],
                }
            ).with_id(row["price_id"])
            by_id[version.price_id] = version
        return Catalog(by_id.values())

    def add(self, versions: Iterable[PriceVersion]) -> list[PriceVersion]:
        """Write versions not already present; returns those written."""
        known = {v.price_id for v in self.load().versions}
        new = [v for v in versions if v.price_id not in known]
        now = datetime.now(UTC)
        self.warehouse.insert(
            "price_versions",
            (
                "price_id",
                "model",
                "provider",
                "effective_from",
                "created_at",
                "source",
                "spec_json",
            ),
            [
                (
                    v.price_id,
                    v.model,
                    v.provider,
                    v.effective_from,
                    now,
                    v.source,
                    json.dumps(v.spec_json(), sort_keys=True),
                )
                for v in new
            ],
        )
        return new

    def seed_if_empty(self) -> int:
        """Load the shipped catalog once, the first time; returns versions added.

        Only once: a later release's seed must not add versions that would
        compete with what the operator has since added or imported.
        """
        if self.warehouse.query("SELECT 1 FROM price_versions WHERE source = 'seed' LIMIT 1"):
            return 0
        return len(self.add(seed_versions()))
