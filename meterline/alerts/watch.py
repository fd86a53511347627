"""Evaluates accounts' alert rules: after each stored batch, for the accounts in it
(a flush handler of the pricing pipeline, after the ledger's debit), and every minute
for every account with rules (the API's sweep: credits come close to their expiry with
no usage at all).

The handler only notes the batch's accounts; a thread of the watcher's own evaluates
them, so a batch's commit never waits for alerts. Notes a stopped (or killed)
pipeline did not evaluate are the next sweep's.

What a rule reads is the source of truth, not a cache: the ledger for credits, the
warehouse for a window's spend and tokens (in the account's time zone, the quota
windows' own definition). An alert fires once per crossing (:mod:`.model`); the store
keeps that true across evaluators. A rule that cannot be evaluated (its account's
plan caps nothing of its kind, the store is down) is skipped and logged; billing never
waits for alerts: the handler swallows its errors, the next sweep catches up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from meterline.accounts.model import AccountNotFound
from meterline.accounts.store import AccountStore
from meterline.alerts.model import Alert, AlertKind, Channel, Rule
from meterline.alerts.postgres import AlertStore
from meterline.credits.model import Balance
from meterline.credits.postgres import PostgresLedger
from meterline.money import format_usd, usd_to_picos
from meterline.quotas.plans import PlanVersion
from meterline.quotas.rebuild import WarehouseCounts
from meterline.quotas.store import PlanStore, in_force
from meterline.quotas.windows import Window, window_bounds, window_id
from meterline.usage.model import PricedEvent

__all__ = ["AlertWatcher"]

log = logging.getLogger(__name__)


@dataclass
class _Account:
    """What the rules of one account read, each read at most once per evaluation."""

    account_id: str
    channels: list[Channel]
    balance: Balance | None = None
    plan: PlanVersion | None = None
    plan_read: bool = False
    timezone: str = "UTC"


class AlertWatcher:
    """Fires the alerts whose thresholds accounts crossed. Blocking."""

    name = "alerts"

    def __init__(
        self,
        store: AlertStore,
        *,
        ledger: PostgresLedger,
        plans: PlanStore,
        accounts: AccountStore,
        counts: WarehouseCounts,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.plans = plans
        self.accounts = accounts
        self.counts = counts
        #: accounts of stored batches, not evaluated yet
        self._due: set[str] = set()
        self._wake = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None

    def on_flush(self, events: Sequence[PricedEvent]) -> None:
        """Note the batch's accounts for the watcher's thread; never fails the batch."""
        if not events:
            return
        with self._wake:
            self._due.update(e.account_id for e in events)
            if self._worker is None and not self._closed:
                self._worker = threading.Thread(
                    target=self._evaluate_due, name="alert-watcher", daemon=True
                )
                self._worker.start()
            self._wake.notify()

    def _evaluate_due(self) -> None:
        while True:
            with self._wake:
                while not self._due and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                due, self._due = self._due, set()
            try:
                self.evaluate(due)
            except Exception as exc:  # the store is down: the next sweep catches up
                log.warning("alerts: could not evaluate %d accounts: %s", len(due), exc)

    def close(self) -> None:
        """Stop the thread; what it has not begun is left to the sweep."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)

    def sweep(self, *, now: datetime | None = None) -> list[Alert]:
        """Every account with rules."""
        return self.evaluate(self.store.accounts_with_rules(), now=now)

    def evaluate(self, account_ids: Iterable[str], *, now: datetime | None = None) -> list[Alert]:
        """Fire what the accounts' rules say now; returns the alerts made."""
        now = now or datetime.now(UTC)
        fired: list[Alert] = []
        for account_id, rules in self.store.rules(sorted(set(account_ids))).items():
            channels = [Channel.KAFKA]
            if self.store.webhook(account_id) is not None:
                channels.append(Channel.WEBHOOK)
            account = _Account(account_id, channels)
            for rule in rules:
                try:
                    fired += self._evaluate(rule, account, now)
                except AccountNotFound:
                    break
        for alert in fired:
            log.info("alerts: %s fired for %s (%s)", alert.kind, alert.account_id, alert.alert_id)
        return fired

    def _evaluate(self, rule: Rule, account: _Account, now: datetime) -> list[Alert]:
        if rule.kind is AlertKind.BALANCE_BELOW:
            assert rule.threshold_picos is not None
            balance = self._balance(account, now)
            below = balance.available_picos < rule.threshold_picos
            payload = {
                "message": f"credits below ${format_usd(rule.threshold_picos)}: "
                f"${format_usd(balance.available_picos)} available",
                "available_usd": format_usd(balance.available_picos),
                "threshold_usd": format_usd(rule.threshold_picos),
            }
            made = self.store.balance_crossing(
                rule, below, payload, channels=account.channels, now=now
            )
            return [made] if made else []
        if rule.kind is AlertKind.CREDITS_EXPIRING:
            assert rule.within is not None
            fired = []
            for grant in self._balance(account, now).grants:
                expires = grant.expires_at
                if expires is None or not now < expires <= now + rule.within:
                    continue
                payload = {
                    "message": f"${format_usd(grant.remaining_picos)} of credits expire at "
                    f"{expires.isoformat()}",
                    "grant_id": grant.grant_id,
                    "remaining_usd": format_usd(grant.remaining_picos),
                    "expires_at": expires.isoformat(),
                }
                made = self.store.fire(
                    rule,
                    f"{rule.rule_id}:{grant.grant_id}",
                    payload,
                    channels=account.channels,
                    now=now,
                )
                fired += [made] if made else []
            return fired
        made = self._share(rule, account, now)
        return [made] if made else []

    def _share(self, rule: Rule, account: _Account, now: datetime) -> Alert | None:
        """spend_share, tokens_share: the window's usage against the plan's cap of it."""
        assert rule.share_percent is not None and rule.calendar is not None
        plan = self._plan(account, now)
        if plan is None:
            return None
        window = Window(rule.calendar)
        limits = plan.limits
        spend = rule.kind is AlertKind.SPEND_SHARE
        if spend:
            cap_usd = (
                limits.spend_per_day_usd if window is Window.DAY else limits.spend_per_month_usd
            )
            cap = None if cap_usd is None else usd_to_picos(cap_usd)
        else:
            cap = limits.tokens_per_day if window is Window.DAY else limits.tokens_per_month
        if not cap:
            return None  # the plan caps nothing of this kind: nothing to reach
        start, end = window_bounds(window, now, account.timezone)
        used = 0
        for usage in self.counts.usage(account.account_id, [(start, end)], now):
            (totals,) = usage.totals
            if spend:
                used += totals.charge_picos
            else:
                used += limits.token_basis.counted(totals.input_tokens, totals.output_tokens)
        if used * 100 < rule.share_percent * cap:
            return None
        name = window_id(window, now, account.timezone)
        shown = format_usd if spend else (lambda n: f"{n:,}")
        what = "spend" if spend else "tokens"
        payload: dict[str, Any] = {
            "message": f"{what} of {window.value} {name} reached {rule.share_percent}% of "
            f"the plan's cap: {shown(used)} of {shown(cap)}",
            "calendar": window.value,
            "window": name,
            "share_percent": rule.share_percent,
            "used": format_usd(used) if spend else str(used),
            "cap": format_usd(cap) if spend else str(cap),
        }
        return self.store.fire(
            rule, f"{rule.rule_id}:{name}", payload, channels=account.channels, now=now
        )

    def _balance(self, account: _Account, now: datetime) -> Balance:
        if account.balance is None:
            account.balance = self.ledger.balance(account.account_id, now=now)
        return account.balance

    def _plan(self, account: _Account, now: datetime) -> PlanVersion | None:
        if not account.plan_read:
            account.plan_read = True
            history = self.plans.histories([account.account_id]).get(account.account_id, ())
            found = in_force(history, now)
            account.plan = None if found is None else found[1]
            account.timezone = self.accounts.account(account.account_id).timezone
        return account.plan
