"""Accounts first seen in usage are registered, so no usage waits on an admin.

A flush handler of the pricing pipeline: after each batch is stored, the
accounts it names that this process has not seen yet are created (status
active, ``registered_by`` "first_event") in one statement; an account that
exists is left as it is. Idempotent, so a replayed batch changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from meterline.accounts.store import AccountStore
from meterline.usage.model import PricedEvent

__all__ = ["AccountRegistrar"]

log = logging.getLogger(__name__)


class AccountRegistrar:
    """:class:`~meterline.usage.store.FlushHandler` that registers unknown accounts."""

    name = "accounts"

    def __init__(self, store: AccountStore) -> None:
        self.store = store
        #: accounts known to exist; they are never deleted, so this only grows
        self._known: set[str] = set()

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        unseen = {e.account_id for e in events} - self._known
        if not unseen:
            return
        created = self.store.register(unseen)
        if created:
            log.info(
                "registered %d accounts on their first usage: %s",
                len(created),
                ", ".join(created[:5]) + (" ..." if len(created) > 5 else ""),
            )
        self._known |= unseen
