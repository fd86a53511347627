"""Authentication without a database round trip: every process keeps the keys in memory.

:class:`KeyRing` holds every key's id, kind, scope, expiry and hash. It asks
the store every ``refresh_s`` for what changed since the generation it has
seen (see the ``key_ring`` table), so a key created or revoked anywhere
takes effect on every replica within that time; a key made or revoked
through this process takes effect here at once. ``last_used_at`` is noted in
memory and written every ``last_used_flush_s``, one statement for all keys.

HTTP (``Authorization: Bearer <key>``) and gRPC (the same in the
``authorization`` metadata) both call :meth:`KeyRing.authenticate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from meterline.accounts.keys import KeyHasher, read_key_id
from meterline.accounts.model import ANYONE, Principal
from meterline.accounts.store import AccountStore, StoredKey

__all__ = [
    "Authenticator",
    "KeyRing",
    "OpenDoor",
    "SecretMismatch",
    "Unauthenticated",
    "bearer_token",
]

log = logging.getLogger(__name__)


class SecretMismatch(RuntimeError):
    """This process's server secret is not the one the stored keys were hashed with."""


class Unauthenticated(Exception):
    """No key, or not a key that is valid now (401 / UNAUTHENTICATED)."""


class Authenticator(Protocol):
    def authenticate(self, key: str | None) -> Principal:
        """Who presents ``key``; raises :class:`Unauthenticated`."""
        ...


def bearer_token(authorization: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` value (scheme case-insensitive)."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class OpenDoor:
    """Authentication off (METERLINE_AUTH=off): everyone is an admin. Local development only."""

    def authenticate(self, key: str | None) -> Principal:
        return ANYONE


class KeyRing:
    """Every key, in memory, kept fresh from the store."""

    def __init__(
        self,
        store: AccountStore,
        hasher: KeyHasher,
        *,
        refresh_s: float = 1.0,
        last_used_flush_s: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.refresh_s = refresh_s
        self.last_used_flush_s = last_used_flush_s
        self.clock = clock
        self._keys: dict[str, StoredKey] = {}
        self._generation = -1
        self._used: dict[str, datetime] = {}
        self._lock = threading.Lock()  # refresh runs in a worker thread

    @property
    def generation(self) -> int:
        return self._generation

    def load(self) -> KeyRing:
        """Check the server secret, then read every key."""
        if not self.store.check_secret(self.hasher.secret_check()):
            raise SecretMismatch(
                "the API keys were made under another server secret: set "
                "METERLINE_KEYS_SECRET to the one every replica uses"
            )
        self.refresh()
        return self

    def refresh(self) -> int:
        """Take in what changed in the store; returns how many keys changed."""
        generation, changed = self.store.keys_since(self._generation)
        with self._lock:
            for stored in changed:
                self._keys[stored.key.key_id] = stored
            self._generation = max(self._generation, generation)
        return len(changed)

    def remember(self, stored: StoredKey) -> None:
        """A key this process just made or revoked: in effect here before the next refresh."""
        with self._lock:
            self._keys[stored.key.key_id] = stored

    def authenticate(self, key: str | None) -> Principal:
        if key is None:
            raise Unauthenticated("no API key: send Authorization: Bearer <key>")
        key_id = read_key_id(key)
        stored = self._keys.get(key_id) if key_id is not None else None
        if stored is None or not self.hasher.matches(key, stored.secret_hash):
            raise Unauthenticated("not a valid API key")
        now = self.clock()
        state = stored.key.state(now)
        if state != "active":
            raise Unauthenticated(f"API key {stored.key.key_id} is {state}")
        self._used[stored.key.key_id] = now
        return stored.key.principal()

    def flush_used(self) -> int:
        """Write the noted ``last_used_at`` times; returns how many keys."""
        used, self._used = self._used, {}
        if used:
            try:
                self.store.touch_keys(used)
            except Exception:
                for key_id, at in used.items():  # kept for the next flush
                    self._used[key_id] = max(at, self._used.get(key_id, at))
                raise
        return len(used)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every ``refresh_s`` and flush ``last_used_at`` until ``stop``, then once more.

        A store that does not answer is logged and retried; the keys known so
        far keep working meanwhile.
        """
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.last_used_flush_s
        failing = False
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.refresh_s)
            try:
                await asyncio.to_thread(self.refresh)
                if loop.time() >= next_flush or stop.is_set():
                    next_flush = loop.time() + self.last_used_flush_s
                    await asyncio.to_thread(self.flush_used)
                if failing:
                    log.info("API keys are refreshed again")
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("cannot refresh API keys, using those known: %s", exc)
                failing = True
