"""Price versions kept in the warehouse table ``price_versions``."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from meterline.catalog.catalog import Catalog, SkippedVersion, parse_price, seed_versions
from meterline.catalog.pricing import PriceVersion
from meterline.lib.warehouse.base import Warehouse

log = logging.getLogger(__name__)


class PriceBook:
    """Price versions in the warehouse: load, add, seed."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse

    def load(self) -> Catalog:
        """Every stored version, as a :class:`Catalog`; never fails because of one version.

        A version that is no longer valid (stored before the bounds of
        :mod:`meterline.money` existed, or inserted by hand) is left out with a
        warning naming its ``price_id`` and the reason, and listed in
        :attr:`Catalog.skipped`: the events it would price stay unpriced, and
        re-priceable, rather than one bad row stopping all billing.

        Stored rates keep their meaning: a rate stored as "0" is free, one
        stored as null (or absent) costs its fallback, the input rate for the
        cache rates. Versions written before fallbacks existed stored "0" for
        every cache rate not given, and so still cost what they cost then.
        """
        rows = self.warehouse.query(
            "SELECT price_id, model, provider, effective_from, source, spec_json "
            "FROM price_versions ORDER BY created_at"
        )
        by_id: dict[str, PriceVersion] = {}
        skipped: dict[str, SkippedVersion] = {}
        for row in rows:
            price_id = str(row.get("price_id"))
            try:
                spec = json.loads(row["spec_json"])
                version = parse_price(
                    {
                        "model": row["model"],
                        "provider": row["provider"],
                        "effective_from": row["effective_from"],
                        "rates": spec["rates"],
                        "tiers": spec.get("tiers") or [],
                        "aliases": spec.get("aliases") or [],
                        "dated_aliases": spec.get("dated_aliases", False),
                        "source": row["source"],
                    }
                ).with_id(price_id)
            except Exception as exc:  # any bad row, whatever is wrong with it, skips that row only
                reason = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "price_versions: %s (%s/%s) skipped: %s",
                    price_id,
                    row.get("provider"),
                    row.get("model"),
                    reason,
                )
                skipped[price_id] = SkippedVersion(
                    price_id, str(row.get("model")), str(row.get("provider")), reason
                )
                by_id.pop(price_id, None)
                continue
            skipped.pop(price_id, None)
            by_id[version.price_id] = version
        return Catalog(by_id.values(), skipped=skipped.values())

    def add(self, versions: Iterable[PriceVersion]) -> list[PriceVersion]:
        """Write versions not already present (skipped ones included); returns those written."""
        catalog = self.load()
        known = {v.price_id for v in catalog.versions} | {s.price_id for s in catalog.skipped}
        new: list[PriceVersion] = []
        for version in versions:
            if version.price_id not in known:
                known.add(version.price_id)
                new.append(version)
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
