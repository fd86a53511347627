"""Each stored batch settles its events' quota reservations with what they used.

A flush handler of the pricing pipeline: after a batch is stored, every event of an
account with a plan in force at its time (the same :class:`~.charges.ChargeBook` the
pipeline charged with) is settled in the quota engine, with its tokens and its charge,
in ONE :meth:`~.engine.QuotaEngine.settle` call for the batch. Events without a plan
are skipped: no limit applies to them. An unpriced event is settled with its tokens
and a charge of 0, as it was charged.

The pipeline calls handlers from its worker thread, and a ``redis.asyncio`` client
must be used on the loop it was made on; so the settler owns one thread running its
own event loop, with the client and the engine made there, and ``on_flush`` waits for
the settle on it.

Redis down does not stop billing: the batch is stored and committed, and its
settlements wait in memory, tried again with the next batch and every
``retry_s`` (the settle is idempotent by event id, so the order they reach Redis in
does not matter). While Redis does not answer, a batch costs no wait beyond one
attempt per ``retry_s``. At most ``max_pending`` settlements wait; beyond, the
oldest are dropped and their accounts' day and month counters deleted once Redis is
back, so the next check rebuilds them from the warehouse, where those events are;
their reservations then expire on their own. PostgreSQL down (the plans, the time
zones) still fails the batch, as it fails charging.

Prepaid accounts' credits, as the ledger poster read them after debiting the batch
(:meth:`QuotaSettler.take_credits`), are written with the settles of their accounts,
in the same script call; while Redis is down they wait with the settlements, the
newest copy per account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import redis.asyncio
from redis.exceptions import RedisError

from meterline.accounts.model import AccountNotFound
from meterline.accounts.store import AccountStore
from meterline.credits.model import CreditState
from meterline.lib.settings import QuotaSettings
from meterline.quotas.charges import ChargeBook
from meterline.quotas.engine import QuotaEngine, Settlement
from meterline.quotas.plans import PlanVersion
from meterline.usage.model import PricedEvent

__all__ = ["MAX_PENDING", "RETRY_S", "TIMEZONE_REFRESH_S", "QuotaSettler"]

log = logging.getLogger(__name__)

#: How long an account's time zone is used before it is asked for again: it rarely
#: changes, and a change moves only where later events' day and month windows fall.
TIMEZONE_REFRESH_S = 5.0
#: Time zone of an account the store does not hold (usage of it may precede its row).
DEFAULT_TIMEZONE = "UTC"
#: While Redis does not answer, a settle is tried at most this often.
RETRY_S = 1.0
#: Settlements kept while Redis does not answer (ten full batches).
MAX_PENDING = 200_000

_Item = tuple[Settlement, PlanVersion, str]

_T = TypeVar("_T")


class QuotaSettler:
    """:class:`~meterline.usage.store.FlushHandler` that settles quota reservations.

    Args:
        redis_url: the Redis the gateways' checks reserve in.
        key_prefix: every key starts with it (``RedisSettings.key_prefix``).
        settings: the engine's settings (how long a settled event id is remembered).
        plans: the book the pipeline charges with, so both see the same plan.
        accounts: where each account's time zone (its calendar days) is read.
        timeout_s: longest one settle call may take before Redis counts as down.
        retry_s, max_pending: while Redis is down, see the module's docstring.
    """

    name = "quotas"

    def __init__(
        self,
        redis_url: str,
        *,
        key_prefix: str,
        settings: QuotaSettings,
        plans: ChargeBook,
        accounts: AccountStore,
        timeout_s: float = 10,
        retry_s: float = RETRY_S,
        max_pending: int = MAX_PENDING,
        timezone_refresh_s: float = TIMEZONE_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plans = plans
        self.accounts = accounts
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_pending = max_pending
        self.timezone_refresh_s = timezone_refresh_s
        self._clock = clock
        #: account -> (when read, its time zone)
        self._timezones: dict[str, tuple[float, str]] = {}
        #: settlements Redis has not taken yet, oldest first (used on the loop only)
        self.pending: list[_Item] = []
        #: accounts whose settlements were dropped: their windows are rebuilt
        self.forgotten: set[str] = set()
        #: prepaid accounts' credits Redis has not taken yet, the newest per account
        self.credits: dict[str, CreditState] = {}
        self._next_try = 0.0
        self._down_since: float | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one settle at a time: a batch's or the retry's
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="quota-settler", daemon=True
        )
        self._thread.start()
        try:
            self._redis, self._engine = self._run(self._connect(redis_url, key_prefix, settings))
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(
        self, redis_url: str, key_prefix: str, settings: QuotaSettings
    ) -> tuple[redis.asyncio.Redis, QuotaEngine]:
        """The client and engine, made on the settler's loop, where they are used."""
        client = redis.asyncio.Redis.from_url(
            redis_url,
            socket_connect_timeout=min(self.timeout_s, 1.0),
            socket_timeout=self.timeout_s,
        )
        self._retrying = asyncio.create_task(self._retry_pending())
        return client, QuotaEngine(client, key_prefix=key_prefix, settings=settings)

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            raise

    # -- the handler --------------------------------------------------------------------

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        """Settle ``events`` in one engine call (with those waiting for Redis); raises
        (the batch is retried) when the plan store or the account store fails."""
        if self._closed:
            raise RuntimeError("the quota settler is closed")
        if not events:
            return
        self.plans.load({e.account_id for e in events})
        items: list[tuple[Settlement, PlanVersion, str]] = []
        for e in events:
            plan = self.plans.plan_at(e.account_id, e.occurred_at)
            if plan is None:
                continue  # no plan, no limits: nothing is counted for it
            settlement = Settlement(
                account_id=e.account_id,
                event_id=e.event_id,
                api_key_id=e.api_key_id or None,
                model=e.model,
                input_tokens=e.usage.input_tokens,
                output_tokens=e.usage.output_tokens,
                charge_picos=e.charge_picos,
                occurred_at=e.occurred_at,
            )
            items.append((settlement, plan, self._timezone(e.account_id)))
        if items or self.credits:
            self._run(self._settle(items))

    def take_credits(self, states: Sequence[CreditState]) -> None:
        """Credits to write with the next settle (the ledger poster's, of this batch)."""
        if states:
            self._run(self._take_credits(states))

    async def _take_credits(self, states: Sequence[CreditState]) -> None:
        for state in states:
            held = self.credits.get(state.account_id)
            if held is None or held.version <= state.version:
                self.credits[state.account_id] = state

    async def _settle(self, items: Sequence[_Item]) -> None:
        """On the loop: settle the waiting settlements and ``items``, or keep them all
        waiting when Redis does not answer."""
        async with self._lock:
            await self._settle_locked(items)

    async def _settle_locked(self, items: Sequence[_Item]) -> None:
        self.pending.extend(items)
        if len(self.pending) > self.max_pending:
            dropped = self.pending[: len(self.pending) - self.max_pending]
            del self.pending[: len(dropped)]
            self.forgotten.update(item[0].account_id for item in dropped)
            log.error(
                "quotas: %d settlements dropped (Redis has not answered for long); the "
                "day and month counters of %d accounts will be rebuilt from the warehouse",
                len(dropped),
                len({item[0].account_id for item in dropped}),
            )
        if not (self.pending or self.credits) or self._clock() < self._next_try:
            return
        try:
            if self.forgotten:
                await self._engine.forget_windows(self.forgotten)
                self.forgotten.clear()
            credits = dict(self.credits)
            applied = await self._engine.settle(self.pending, credits=credits)
        except (RedisError, OSError) as exc:
            self._next_try = self._clock() + self.retry_s
            if self._down_since is None:
                self._down_since = self._clock()
                log.error(
                    "quotas: Redis did not take %d settlements (%s); pricing goes on, they "
                    "wait and are tried again every %.0f s",
                    len(self.pending),
                    exc,
                    self.retry_s,
                )
            return
        if self._down_since is not None:
            log.info(
                "quotas: Redis answers again after %.0f s: %d waiting settlements applied",
                self._clock() - self._down_since,
                len(self.pending),
            )
            self._down_since = None
        log.debug("quotas: settled %d events (%d applied)", len(self.pending), applied)
        self.pending.clear()
        for account_id, state in credits.items():
            if self.credits.get(account_id) is state:
                del self.credits[account_id]

    async def _retry_pending(self) -> None:
        """Waiting settlements reach Redis without waiting for the next batch."""
        while True:
            await asyncio.sleep(self.retry_s)
            if self.pending or self.credits:
                try:
                    await self._settle(())
                except Exception:  # logged; the next batch tries again
                    log.exception("quotas: retrying waiting settlements failed")

    def _timezone(self, account_id: str) -> str:
        """The account's time zone, read once per account per ``timezone_refresh_s``."""
        now = self._clock()
        held = self._timezones.get(account_id)
        if held is not None and now - held[0] < self.timezone_refresh_s:
            return held[1]
        try:
            timezone = self.accounts.account(account_id).timezone
        except AccountNotFound:
            timezone = DEFAULT_TIMEZONE
        self._timezones[account_id] = (now, timezone)
        return timezone

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Close the client and stop the loop and its thread; closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        if self.pending:
            log.warning(
                "quotas: stopping with %d settlements Redis has not taken; their "
                "reservations expire on their own",
                len(self.pending),
            )
        try:
            self._run(self._stop_retrying())
            self._run(self._redis.aclose())
        except Exception as exc:  # the loop stops all the same
            log.warning("quotas: closing the Redis client failed: %s", exc)
        finally:
            self._stop_loop()

    async def _stop_retrying(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QuotaSettler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
