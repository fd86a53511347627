"""The model catalog: effective-dated prices per (model, provider).

:class:`Catalog` is the in-memory index the pipeline prices with; the price
versions themselves live in the warehouse table ``price_versions``, written
by :class:`PriceBook`. A version is never changed once written: a new price
is a new version with a later ``effective_from``, and events already priced
keep the ``price_id`` that priced them.
"""

from meterline.catalog.book import PriceBook
from meterline.catalog.catalog import Catalog, model_key, parse_price, seed_versions

__all__ = ["Catalog", "PriceBook", "model_key", "parse_price", "seed_versions"]
