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
the settle on it. A failure is raised to the pipeline, which retries the batch: the
settle is idempotent by event id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import redis.asyncio

from meterline.accounts.model import AccountNotFound
from meterline.accounts.store import AccountStore
from meterline.lib.settings import QuotaSettings
from meterline.quotas.charges import ChargeBook
from meterline.quotas.engine import QuotaEngine, Settlement
from meterline.quotas.plans import PlanVersion
from meterline.usage.model import PricedEvent

__all__ = ["TIMEZONE_REFRESH_S", "QuotaSettler"]

log = logging.getLogger(__name__)

#: How long an account's time zone is used before it is asked for again: it rarely
#: changes, and a change moves only where later events' day and month windows fall.
TIMEZONE_REFRESH_S = 5.0
#: Time zone of an account the store does not hold (usage of it may precede its row).
DEFAULT_TIMEZONE = "UTC"

_T = TypeVar("_T")


class QuotaSettler:
    """:class:`~meterline.usage.store.FlushHandler` that settles quota reservations.

    Args:
        redis_url: the Redis the gateways' checks reserve in.
        key_prefix: every key starts with it (``RedisSettings.key_prefix``).
        settings: the engine's settings (how long a settled event id is remembered).
        plans: the book the pipeline charges with, so both see the same plan.
        accounts: where each account's time zone (its calendar days) is read.
        timeout_s: longest a batch's settle may take before the batch fails.
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
        timezone_refresh_s: float = TIMEZONE_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plans = plans
        self.accounts = accounts
        self.timeout_s = timeout_s
        self.timezone_refresh_s = timezone_refresh_s
        self._clock = clock
        #: account -> (when read, its time zone)
        self._timezones: dict[str, tuple[float, str]] = {}
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
            redis_url, socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s
        )
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
        """Settle ``events`` in one engine call; raises (the batch is retried) when the
        plan store, the account store or Redis fails."""
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
        if not items:
            return
        applied = self._run(self._engine.settle(items))
        log.debug("quotas: settled %d of %d events (%d applied)", len(items), len(events), applied)

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
        try:
            self._run(self._redis.aclose())
        except Exception as exc:  # the loop stops all the same
            log.warning("quotas: closing the Redis client failed: %s", exc)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=self.timeout_s)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> QuotaSettler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
