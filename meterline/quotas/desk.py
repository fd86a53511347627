"""What a quota check needs besides Redis, kept at hand: the account, its plan, prices.

:class:`QuotaDesk` answers the gateways' checks (the gRPC QuotaService) and the quota
route of the HTTP API. A check must take about a millisecond, so nothing on its path
waits on PostgreSQL or ClickHouse once an account has been seen:

* an account's status, time zone and plan history are held for ``refresh_s`` and then
  refreshed in the background, the held ones answering meanwhile (a suspension or a
  new plan so takes effect within about ``refresh_s``);
* the catalog is reloaded every ``refresh_s`` in the background;
* a counter Redis lacks is rebuilt from the warehouse (:mod:`.rebuild`), once per
  account at a time however many checks find it missing;
* a prepaid account's credits Redis lacks (or holds past their time) are read from
  the ledger and written there, once per account at a time likewise.

The estimate of a request's charge is the pipeline's own pricing
(:func:`~meterline.usage.model.price_of`, then the plan's sell price) applied to the
estimated usage: the input tokens and the output the engine reserves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import redis.asyncio

from meterline.accounts.model import AccountNotFound, AccountStatus
from meterline.accounts.store import AccountStore
from meterline.catalog import Catalog, PriceBook
from meterline.credits.postgres import PostgresLedger
from meterline.lib.settings import QuotaSettings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.engine import (
    Decision,
    LimitState,
    NeedsRebuild,
    QuotaEngine,
    QuotaRequest,
    WindowRef,
)
from meterline.quotas.plans import PlanVersion
from meterline.quotas.rebuild import WarehouseCounts, rebuild
from meterline.quotas.store import PlanHistory, PlanStore, in_force
from meterline.tokens import TokenUsage
from meterline.usage.model import price_of

__all__ = ["TERMS_REFRESH_S", "AccountTerms", "QuotaDesk"]

log = logging.getLogger(__name__)

#: How long an account's terms and the catalog are used before they are read again.
TERMS_REFRESH_S = 5.0
#: Time zone of an account the store does not hold yet (its first event registers it).
DEFAULT_TIMEZONE = "UTC"


@dataclass(frozen=True, slots=True)
class AccountTerms:
    """What a check needs of an account, as the store said at ``loaded_at``."""

    exists: bool
    suspended: bool
    timezone: str
    history: PlanHistory
    loaded_at: float

    def plan_at(self, at: datetime) -> PlanVersion | None:
        found = in_force(self.history, at)
        return None if found is None else found[1]


class QuotaDesk:
    """Checks, releases and reports of quotas, with their accounts, plans and prices.

    Args:
        redis: the shared Redis (a client made on the loop that will use it).
        key_prefix: ``RedisSettings.key_prefix``.
        settings: the engine's settings.
        accounts, plans: the PostgreSQL stores (blocking; called off the loop).
        ledger: where a prepaid account's credits are read (blocking).
        warehouse: where prices are read and counters rebuilt from (blocking).
    """

    def __init__(
        self,
        redis: redis.asyncio.Redis,
        *,
        key_prefix: str,
        settings: QuotaSettings,
        accounts: AccountStore,
        plans: PlanStore,
        ledger: PostgresLedger,
        warehouse: Warehouse,
        refresh_s: float = TERMS_REFRESH_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = QuotaEngine(redis, key_prefix=key_prefix, settings=settings)
        self.settings = settings
        self.accounts = accounts
        self.plans = plans
        self.ledger = ledger
        self.prices = PriceBook(warehouse)
        self.counts = WarehouseCounts(warehouse)
        self.refresh_s = refresh_s
        self._clock = clock
        self.catalog = Catalog(())
        self._terms: dict[str, AccountTerms] = {}
        self._refreshing: dict[str, asyncio.Task[AccountTerms]] = {}
        self._rebuilding: dict[str, asyncio.Task[int]] = {}
        self._crediting: dict[str, asyncio.Task[int]] = {}
        self._catalog_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the catalog, and keep it fresh until :meth:`close`."""
        self.catalog = await asyncio.to_thread(self.prices.load)
        self._catalog_task = asyncio.create_task(self._keep_catalog())

    async def _keep_catalog(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                self.catalog = await asyncio.to_thread(self.prices.load)
            except Exception as exc:  # keep the prices loaded before
                log.warning("quotas: could not reload the catalog: %s", exc)

    async def close(self) -> None:
        tasks = [t for t in (self._catalog_task, *self._refreshing.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- accounts -----------------------------------------------------------------------

    def _load_terms(self, account_id: str) -> AccountTerms:
        """Blocking: the account and its plan history, from PostgreSQL."""
        try:
            account = self.accounts.account(account_id)
            exists, timezone = True, account.timezone
            suspended = account.status is AccountStatus.SUSPENDED
        except AccountNotFound:
            exists, suspended, timezone = False, False, DEFAULT_TIMEZONE
        history = self.plans.histories([account_id]).get(account_id, ())
        return AccountTerms(exists, suspended, timezone, history, self._clock())

    async def _fetch_terms(self, account_id: str) -> AccountTerms:
        try:
            terms = await asyncio.to_thread(self._load_terms, account_id)
            self._terms[account_id] = terms
            return terms
        finally:
            self._refreshing.pop(account_id, None)

    async def terms(self, account_id: str) -> AccountTerms:
        """The account's terms: held ones at once (refreshed behind when older than
        ``refresh_s``); read and waited for the first time. Raises the store's error
        when it is down and nothing is held."""
        held = self._terms.get(account_id)
        fresh = held is not None and self._clock() - held.loaded_at < self.refresh_s
        if fresh:
            assert held is not None
            return held
        task = self._refreshing.get(account_id)
        if task is None:
            task = asyncio.create_task(self._fetch_terms(account_id))
            self._refreshing[account_id] = task
            if held is not None:
                task.add_done_callback(_log_refresh_failure)
        if held is not None:
            return held
        return await asyncio.shield(task)

    # -- checks -------------------------------------------------------------------------

    def estimated_charge(self, request: QuotaRequest, plan: PlanVersion, at: datetime) -> int:
        """What the request would be charged at most: its input tokens and the output
        the engine reserves, priced by the catalog and the plan's sell price."""
        usage = TokenUsage(
            input_tokens=request.input_tokens,
            output_tokens=self.engine.reserved_output(request),
        )
        price_id, _, cost = price_of(self.catalog, request.model, request.provider, at, usage)
        return plan.charge_picos(cost) if price_id else 0

    async def check(self, request: QuotaRequest, *, now: datetime | None = None) -> Decision:
        """May ``request`` run now? Allowed means reserved (see :class:`QuotaEngine`)."""
        at = now or datetime.now(UTC)
        terms = await self.terms(request.account_id)
        if terms.suspended:
            return Decision(False, "account_suspended", "the account is suspended")
        plan = terms.plan_at(at)
        if plan is None:
            return Decision(True, None, "allowed: the account has no plan, so no limit")
        estimate = self.estimated_charge(request, plan, at)
        for attempt in range(2):
            decision = await self.engine.check(
                request,
                plan,
                timezone=terms.timezone,
                suspended=False,
                estimated_charge_picos=estimate,
                now=now,
            )
            missing = bool(decision.needs_rebuild or decision.needs_credits)
            if not missing or attempt:
                break
            await self._restore(
                request.account_id,
                plan,
                decision.needs_rebuild,
                credits=decision.needs_credits,
                now=now,
            )
        if decision.needs_rebuild or decision.needs_credits:
            # restored, and gone again: Redis is losing keys
            return self.engine.unavailable("its counters are not in Redis")
        return decision

    async def _restore(
        self,
        account_id: str,
        plan: PlanVersion,
        refs: Sequence[WindowRef],
        *,
        credits: bool,
        now: datetime | None,
    ) -> None:
        if refs:
            await self._rebuild(account_id, plan, refs)
        if credits:
            await self._credits(account_id, now)

    async def refresh_credits(self, account_id: str) -> None:
        """Write the account's credits, as the ledger says them now, where checks read
        them (after a grant, a void, an adjustment): a read of its own, as one under
        way may have begun before that posting. Only a prepaid account's are kept."""
        if await self._prepaid(account_id):
            await self._read_credits(account_id, None)

    async def credit_holds(self, account_id: str) -> int:
        if not await self._prepaid(account_id):
            return 0  # only prepaid accounts' requests hold credits
        return await self.engine.credit_holds(account_id)

    async def _prepaid(self, account_id: str) -> bool:
        plan = (await self.terms(account_id)).plan_at(datetime.now(UTC))
        return plan is not None and plan.billing == "prepaid"

    async def _credits(self, account_id: str, now: datetime | None) -> None:
        """Write the account's credits from the ledger; checks of the account that find
        them missing meanwhile wait for this one read."""
        task = self._crediting.get(account_id)
        if task is None:
            task = asyncio.create_task(self._read_credits(account_id, now))
            self._crediting[account_id] = task
            task.add_done_callback(lambda _: self._crediting.pop(account_id, None))
        await asyncio.shield(task)

    async def _read_credits(self, account_id: str, now: datetime | None) -> int:
        """``now``: tests only, the clock of the ledger's read and of Redis."""
        state = await asyncio.to_thread(lambda: self.ledger.credit(account_id, now=now))
        return await self.engine.publish_credits([state], now=now)

    async def _rebuild(self, account_id: str, plan: PlanVersion, refs: Sequence[WindowRef]) -> None:
        """Rebuild ``refs``; checks of the account that find them missing meanwhile wait
        for this one rebuild."""
        task = self._rebuilding.get(account_id)
        if task is None:
            task = asyncio.create_task(rebuild(self.engine, self.counts, account_id, plan, refs))
            self._rebuilding[account_id] = task
            task.add_done_callback(lambda _: self._rebuilding.pop(account_id, None))
        done = await asyncio.shield(task)
        if done:
            log.info("quotas: rebuilt %d counters of %s from the warehouse", done, account_id)

    async def release(self, account_id: str, event_id: str) -> bool:
        return await self.engine.release(account_id, event_id)

    async def usage(
        self,
        account_id: str,
        *,
        api_key_id: str | None = None,
        model: str | None = None,
        now: datetime | None = None,
    ) -> tuple[AccountTerms, PlanVersion | None, list[LimitState]]:
        """The account's terms, its plan now, and every limit of it (and of the key's and
        the model's scopes, when given) with what is used; reserves nothing."""
        at = now or datetime.now(UTC)
        terms = await self.terms(account_id)
        plan = terms.plan_at(at)
        if plan is None:
            return terms, None, []
        for attempt in range(2):
            try:
                states = await self.engine.usage(
                    account_id,
                    plan,
                    terms.timezone,
                    api_key_id=api_key_id,
                    model=model,
                    now=now,
                )
                return terms, plan, states
            except NeedsRebuild as missing:
                if attempt:
                    raise
                await self._restore(
                    account_id, plan, missing.windows, credits=missing.credits, now=now
                )
        raise AssertionError("unreachable")


def _log_refresh_failure(task: asyncio.Task[AccountTerms]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("quotas: could not refresh an account's terms (keeping them): %s", exc)
