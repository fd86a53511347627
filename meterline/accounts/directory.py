"""Which accounts exist, as ingest asks when unknown accounts are refused.

With ``METERLINE_ACCOUNTS_UNKNOWN=reject`` ingest rejects usage for an
account nobody created. Accounts are never deleted, so an account found
once is known for good and never looked up again. An id not found is
remembered only ``unknown_ttl_s``: an account created meanwhile is taken
within that time, and a gateway that keeps sending an unknown id costs one
lookup per interval, not one per event. At most ``max_unknown`` such ids
are remembered, the oldest forgotten first, so random ids cannot grow it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from typing import Protocol

__all__ = ["AccountDirectory", "AccountLookup"]


class AccountLookup(Protocol):
    """The part of :class:`~meterline.accounts.store.AccountStore` the directory needs."""

    def known(self, account_ids: Collection[str]) -> set[str]:
        """Those of ``account_ids`` that exist (blocking)."""
        ...


class AccountDirectory:
    """Existence of accounts, from the store, remembered."""

    def __init__(
        self,
        store: AccountLookup,
        *,
        unknown_ttl_s: float = 2.0,
        max_unknown: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` gives seconds on a monotonic scale (tests set it)."""
        self.store = store
        self.unknown_ttl_s = unknown_ttl_s
        self.max_unknown = max_unknown
        self.clock = clock
        self._known: set[str] = set()
        #: id -> when it is asked again; insertion order is age, oldest first
        self._unknown: dict[str, float] = {}

    async def known(self, account_ids: Collection[str]) -> set[str]:
        """Those of ``account_ids`` that exist: one store lookup, in a worker thread,
        for the ids neither known nor recently found unknown."""
        wanted = set(account_ids)
        found = wanted & self._known
        now = self.clock()
        ask = [a for a in wanted - found if self._unknown.get(a, now) <= now]
        if not ask:
            return found
        exist = await asyncio.to_thread(self.store.known, ask)
        self._known |= exist
        found |= exist & wanted
        until = self.clock() + self.unknown_ttl_s
        for account_id in ask:
            self._unknown.pop(account_id, None)  # re-inserted below as the newest
            if account_id not in exist:
                self._unknown[account_id] = until
        while len(self._unknown) > self.max_unknown:
            del self._unknown[next(iter(self._unknown))]
        return found
