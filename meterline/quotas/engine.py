"""The quota engine: may this account (and this API key) make this request now?

A gateway asks :meth:`QuotaEngine.check` before it forwards a request. Every replica
shares one Redis, and each check is ONE Lua script call there: it judges the request
against every limit of every scope (the account, its API key, each model pattern it
matches) and, when it fits them all, reserves its estimate in each, atomically. So
the answer is exact across replicas, in about a millisecond. The pricing pipeline
later settles the reservation with what the request used (:meth:`~QuotaEngine.settle`);
:meth:`~QuotaEngine.release` frees one whose request never ran; one never settled
expires after ``reservation_ttl_s`` and is undone by the next check of its account.

**The rolling minute is a sliding-window log**, not GCRA. windows.py defines the
minute limits as "each request is judged against the 60 s before it", and a log is
that definition: a request fits when the requests (tokens) of the last 60 s plus its
own are at most the cap, so no 60 s span ever holds more than the cap. GCRA with a
burst of the cap admits up to twice the cap in some 60 s spans. The cost: one ZSET
entry per request of the last minute (its tokens in the member, running totals
beside it, so a check is O(1) amortized: each entry is added and dropped once), and
a denial's retry_after reads the oldest entries (for tokens, at most 1,024 of them).
Capacity comes back entry by entry, exactly 60 s after each admitted request.

Bounds (what a cap can be exceeded by):

* requests (per minute, per day, in flight): never; a request is admitted only if it
  fits with the others, all judged in one script.
* tokens and spend: a request is admitted only if its estimate fits, so what is
  *reserved* never exceeds a cap. A settle replaces the estimate by what was used; if
  that is more (output beyond ``max_reserved_output_tokens``, or a charge above the
  caller's estimate), the counter goes over the cap by that difference of the
  requests already admitted, and later requests wait for it: a settle never admits.

Calendar days and months are the account's (:mod:`.windows`, the one definition):
their key names and bounds are computed here and given to the script. A check counts
in the windows of now, a settle in those of when the event occurred. Redis is a cache
of the warehouse: a day or month counter the plan caps that is ABSENT is not zero;
the check answers ``needs_rebuild`` and the caller rebuilds those counters from the
warehouse (:mod:`.rebuild`: :meth:`~QuotaEngine.begin_rebuild`, then
:meth:`~QuotaEngine.finish_rebuild`). A check that finds a window also starts the next one at
zero (it is then complete from its first instant), so a rebuild is needed after Redis
lost its data, after a plan begins to cap a window, or after a whole window without a
check; not at every midnight.

Keys are ``{prefix}{a:<account_id>}:...``: one hash slot per account, so a check is
one slot of a Redis Cluster. Undoing an expired reservation touches the keys it
lists, which the script was not given in KEYS; they are all in that slot. Scripts
run on Redis 6.2 and 7 (EVALSHA, ``TIME`` for the clock; no functions).

**Prepaid credits.** A prepaid plan's request must also fit in the account's credits
less what the requests in flight hold: Redis keeps a copy of what the ledger says the
account may spend (:class:`~meterline.credits.model.CreditState`, written with the
ledger's version so that the newest copy stays, whatever order writes come in) and the
holds apart. A check holds its estimated charge; the settle that frees the hold writes,
in the same script call, the copy the pipeline read after posting those events' debit
(:meth:`~QuotaEngine.settle`), so the charge is never out of both. A copy absent or
past its time (a grant expires or takes effect; at most ``CREDIT_REFRESH_S`` old) is
read from the ledger again (``needs_credits``). So the credits are overspent by at most
what settles charge beyond their requests' estimates.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from importlib import resources
from typing import Literal

import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from meterline.credits.model import CreditState
from meterline.lib.settings import QuotaSettings
from meterline.money import PICOS_PER_USD, format_usd, usd_to_picos
from meterline.quotas.plans import Limits, PlanVersion, TokenBasis
from meterline.quotas.windows import Window, window_bounds, window_id

__all__ = [
    "CREDIT_REFRESH_S",
    "IN_FLIGHT_RETRY_S",
    "REASONS",
    "Decision",
    "LimitState",
    "NeedsRebuild",
    "QuotaEngine",
    "QuotaRequest",
    "RecentEvent",
    "Settlement",
    "WindowRef",
    "WindowTotals",
    "request_scopes",
]

log = logging.getLogger(__name__)

#: Reason codes of a denial (and of an answer without Redis), in the order limits are
#: judged within a scope; scopes go account, API key, models.
REASONS = (
    "insufficient_credits",
    "requests_per_minute",
    "requests_per_day",
    "tokens_per_minute",
    "tokens_per_day",
    "tokens_per_month",
    "spend_per_day",
    "spend_per_month",
    "in_flight",
    "model_not_allowed",
    "account_suspended",
    "redis_unavailable",
)
_ORDER = {name: i for i, name in enumerate(REASONS)}
#: the limit named otherwise than its reason code: a prepaid account's credits
_ORDER["credits"] = _ORDER["insufficient_credits"]
_REASON_OF = {"credits": "insufficient_credits"}

#: retry_after of a request denied for in-flight requests: a slot frees when one ends,
#: which nothing here can foresee.
IN_FLIGHT_RETRY_S = 1.0
#: A day or month counter lives this long after its window ends (late usage, reports).
WINDOW_KEY_MARGIN = timedelta(days=1)
#: Expired reservations a script call undoes first, at most: more than one a check, so
#: leaks drain, and a bounded cost.
PURGE_PER_CALL = 16
#: Events of one account in one settle script call, at most (a batch can hold 20,000).
SETTLE_CHUNK = 500
#: A copy of an account's credits in Redis is read from the ledger again after this
#: long at most: a copy a failed write left stale is right again within it.
CREDIT_REFRESH_S = 60.0


@dataclass(frozen=True, slots=True)
class QuotaRequest:
    """A request a gateway is about to forward."""

    account_id: str
    api_key_id: str | None
    model: str
    provider: str
    input_tokens: int
    #: None: the request sets none; ``max_reserved_output_tokens`` is reserved
    max_output_tokens: int | None
    #: the id its usage event will have, which settles the reservation
    event_id: str


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit of one scope, now: requests, tokens, or pico-dollars for spend and
    credits (``used``: held by requests in flight, ``cap``: what the ledger holds)."""

    #: the limit, named as the reason codes name it ("requests_per_minute"); "credits"
    #: for a prepaid account's (reason insufficient_credits)
    limit: str
    #: "account", "api_key:<id>" or "model:<pattern>"
    scope: str
    #: counted, with this request's reservation when it was admitted
    used: int
    #: the plan's cap
    cap: int
    remaining: int
    #: the end of the calendar window; None for the rolling minute and in-flight
    resets_at: datetime | None

    def shown(self, value: int) -> str:
        """One of its amounts as answers give it: decimal USD for money, else a count."""
        return format_usd(value) if _is_money(self.limit) else str(value)


@dataclass(frozen=True, slots=True)
class WindowRef:
    """A day or month counter of one scope: [start, end) in UTC."""

    scope: str
    window: Window
    window_id: str
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class WindowTotals:
    """What the warehouse holds for one scope in one window."""

    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    charge_picos: int = 0


@dataclass(frozen=True, slots=True)
class RecentEvent:
    """An event the warehouse holds, priced lately: its settle may still come."""

    event_id: str
    api_key_id: str | None
    model: str
    occurred_at: datetime
    input_tokens: int
    output_tokens: int
    charge_picos: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a check.

    ``needs_rebuild`` not empty or ``needs_credits``: nothing was reserved and
    ``allowed`` is False; rebuild those counters (:mod:`.rebuild`), write the account's
    credits from the ledger (:meth:`QuotaEngine.publish_credits`), and check again.
    """

    allowed: bool
    #: a code of :data:`REASONS`; None when allowed (redis_unavailable may allow)
    reason: str | None
    message: str
    #: seconds until the request would fit: the latest of the limits it trips
    retry_after_s: float = 0.0
    #: every limit judged, with what remains
    limits: list[LimitState] = field(default_factory=list)
    needs_rebuild: list[WindowRef] = field(default_factory=list)
    needs_credits: bool = False
    #: the scope of the limit ``reason`` names
    scope: str | None = None

    @property
    def credits(self) -> LimitState | None:
        """A prepaid account's credits: what requests in flight hold, of what it has."""
        return next((s for s in self.limits if s.limit == "credits"), None)


@dataclass(frozen=True, slots=True)
class Settlement:
    """A priced usage event: what a request used and what the account pays for it."""

    account_id: str
    event_id: str
    api_key_id: str | None
    model: str
    input_tokens: int
    output_tokens: int
    charge_picos: int
    occurred_at: datetime


class NeedsRebuild(Exception):
    """:meth:`QuotaEngine.usage` found counters (or credits) Redis does not hold."""

    def __init__(self, windows: list[WindowRef], credits: bool = False) -> None:
        names = [f"{w.scope} {w.window_id}" for w in windows] + ["credits"] * credits
        super().__init__(", ".join(names))
        self.windows = windows
        self.credits = credits


def _script(name: str) -> str:
    scripts = resources.files("meterline.quotas") / "scripts"
    common = (scripts / "common.lua").read_text(encoding="utf-8")
    return common + "\n" + (scripts / name).read_text(encoding="utf-8")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: (window, time zone) pairs whose current window an engine keeps at hand.
_CALENDAR_SIZE = 4096


@functools.lru_cache(maxsize=1024)
def _expiry_ms(end: datetime) -> int:
    """When a window's counters expire: a margin after it ends (late usage, reports)."""
    return _ms(end + WINDOW_KEY_MARGIN)


def _ms(at: datetime) -> int:
    """An instant as ms since the epoch, exactly (a float timestamp can lose the last ms)."""
    if at.tzinfo is None:
        raise ValueError(f"{at} has no time zone: give instants as aware datetimes")
    return (at - _EPOCH) // timedelta(milliseconds=1)


def request_scopes(
    plan: PlanVersion, api_key_id: str | None, model: str | None
) -> list[tuple[str, Limits]]:
    """The scopes a request falls in, in the order they are judged (None: not that kind)."""
    limits = plan.limits
    scopes: list[tuple[str, Limits]] = [("account", limits)]
    if api_key_id and limits.per_api_key is not None:
        scopes.append((f"api_key:{api_key_id}", limits.per_api_key))
    if model is not None:
        scopes.extend((f"model:{p}", lim) for p, lim in limits.model_limits(model))
    return scopes


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a Redis SCAN pattern."""
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _spend_cap(usd: Decimal | None) -> int | None:
    return None if usd is None else usd_to_picos(usd)


def _window_caps(limits: Limits, window: Window) -> tuple[int | None, int | None, int | None]:
    """(requests, tokens, spend picos) caps of ``window``; None: not capped."""
    if window is Window.DAY:
        return (
            limits.requests_per_day,
            limits.tokens_per_day,
            _spend_cap(limits.spend_per_day_usd),
        )
    return None, limits.tokens_per_month, _spend_cap(limits.spend_per_month_usd)


def _caps_window(limits: Limits, window: Window) -> bool:
    return any(cap is not None for cap in _window_caps(limits, window))


def _scope_label(scope: str) -> str:
    kind, _, name = scope.partition(":")
    return {"account": "the account", "api_key": f"API key {name}"}.get(kind, f"models {name}")


def _is_money(limit: str) -> bool:
    return limit.startswith("spend") or limit == "credits"


def _amount(limit: str, value: int) -> str:
    return f"${format_usd(value)}" if _is_money(limit) else f"{value:,}"


@dataclass(frozen=True, slots=True)
class _Group:
    """Counters of one scope the check script reads together (see check.lua)."""

    kind: Literal["m", "f", "w", "c"]  # minute, in flight, calendar window, credits
    scope: str
    limits: Limits
    ref: WindowRef | None = None

    @property
    def width(self) -> int:
        return {"m": 5, "f": 1, "w": 6, "c": 5}[self.kind]


@dataclass(frozen=True, slots=True)
class _Judged:
    state: LimitState
    estimate: int
    retry_after_s: float  # when it trips
    never_fits: bool = False

    @property
    def trips(self) -> bool:
        return self.state.used + self.estimate > self.state.cap


class QuotaEngine:
    """Checks, reservations and settles of quotas, on one shared Redis.

    Args:
        redis: the client (a pool; every replica points at the same server).
        key_prefix: every key starts with it (``RedisSettings.key_prefix``).
        settings: ttl of reservations, the output reserved, what to do without Redis.
    """

    def __init__(
        self, redis: redis.asyncio.Redis, *, key_prefix: str, settings: QuotaSettings
    ) -> None:
        self._redis = redis
        self._prefix = key_prefix
        self._settings = settings
        self._check = redis.register_script(_script("check.lua"))
        self._settle = redis.register_script(_script("settle.lua"))
        self._release = redis.register_script(_script("release.lua"))
        self._rebuild_begin = redis.register_script(_script("rebuild_begin.lua"))
        self._rebuild_finish = redis.register_script(_script("rebuild_finish.lua"))
        self._credit_publish = redis.register_script(_script("credit_publish.lua"))
        self._redis_down = False
        #: (window, time zone) -> the last such window found: start, end, id
        self._calendar: dict[tuple[Window, str], tuple[datetime, datetime, str]] = {}

    # -- keys ---------------------------------------------------------------------------

    def _base(self, account_id: str) -> str:
        return f"{self._prefix}{{a:{account_id}}}:"

    def _window_key(self, base: str, ref: WindowRef) -> str:
        return f"{base}{ref.window.value}:{ref.window_id}:{ref.scope}"

    def _ref(self, scope: str, window: Window, at: datetime, timezone: str) -> WindowRef:
        """The ``window`` holding ``at`` in ``timezone``; the last one found per (window,
        time zone) is kept, as checks ask for the same day and month all day long."""
        held = self._calendar.get((window, timezone))
        if held is None or not held[0] <= at < held[1]:
            start, end = window_bounds(window, at, timezone)
            held = (start, end, window_id(window, at, timezone))
            if len(self._calendar) >= _CALENDAR_SIZE:
                self._calendar.clear()
            self._calendar[window, timezone] = held
        return WindowRef(scope, window, held[2], held[0], held[1])

    def _groups(
        self,
        plan: PlanVersion,
        api_key_id: str | None,
        model: str | None,
        at: datetime,
        timezone: str,
    ) -> list[_Group]:
        groups: list[_Group] = []
        if plan.billing == "prepaid":
            groups.append(_Group("c", "account", plan.limits))
        for scope, limits in request_scopes(plan, api_key_id, model):
            if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
                groups.append(_Group("m", scope, limits))
            if limits.max_in_flight is not None:
                groups.append(_Group("f", scope, limits))
            for window in (Window.DAY, Window.MONTH):
                if _caps_window(limits, window):
                    groups.append(
                        _Group("w", scope, limits, self._ref(scope, window, at, timezone))
                    )
        return groups

    def _check_layout(
        self, base: str, groups: Sequence[_Group], timezone: str
    ) -> tuple[list[str], list[str | int]]:
        keys: list[str] = []
        args: list[str | int] = []
        for g in groups:
            lim = g.limits
            if g.kind == "m":
                keys += [f"{base}min:{g.scope}", f"{base}mint:{g.scope}"]
                args += ["m", lim.requests_per_minute or 0, lim.tokens_per_minute or 0]
            elif g.kind == "f":
                keys.append(f"{base}fly:{g.scope}")
                args += ["f", lim.max_in_flight or 0]
            elif g.kind == "c":
                keys += [f"{base}credit", f"{base}hold"]
                args.append("c")
            else:
                assert g.ref is not None
                following = self._ref(g.scope, g.ref.window, g.ref.end, timezone)
                requests, tokens, spend = _window_caps(lim, g.ref.window)
                keys += [self._window_key(base, g.ref), self._window_key(base, following)]
                args += [
                    "w",
                    _expiry_ms(g.ref.end),
                    _expiry_ms(following.end),
                    requests or 0,
                    tokens or 0,
                    "" if spend is None else str(spend),
                ]
        return keys, args

    # -- check --------------------------------------------------------------------------

    async def check(
        self,
        request: QuotaRequest,
        plan: PlanVersion,
        *,
        timezone: str,
        suspended: bool,
        estimated_charge_picos: int,
        now: datetime | None = None,
    ) -> Decision:
        """May ``request`` run now? When it may, its estimate is reserved in every limit.

        The estimate is ``input_tokens`` plus ``max_output_tokens`` up to
        ``max_reserved_output_tokens``, and ``estimated_charge_picos``. One Redis round
        trip; none for a suspended account, a model the plan refuses, or a plan without
        limits Redis counts.

        Args:
            now: tests only: the clock, for the windows and the script; None: this
                process's clock picks the calendar windows, Redis's ``TIME`` the rest.
        """
        if not request.event_id:
            raise ValueError("a check needs the event_id its usage will settle")
        if request.input_tokens < 0 or (request.max_output_tokens or 0) < 0:
            raise ValueError("token counts are not negative")
        if estimated_charge_picos < 0:
            raise ValueError("estimated_charge_picos is not negative")
        if suspended:
            return Decision(False, "account_suspended", "the account is suspended")
        if not plan.limits.model_allowed(request.model):
            return Decision(
                False,
                "model_not_allowed",
                f"the plan {plan.plan_id} does not allow the model {request.model}",
            )
        at = now or datetime.now(UTC)
        clock = "" if now is None else _ms(now)
        groups = self._groups(plan, request.api_key_id, request.model, at, timezone)
        if not groups:
            return Decision(True, None, "allowed: the plan sets no limit that is counted")
        reserved_output = self.reserved_output(request)
        base = self._base(request.account_id)
        keys, args = self._check_layout(base, groups, timezone)
        try:
            result = await self._check(
                keys=[f"{base}res", f"{base}r:{request.event_id}", *keys],
                args=[
                    clock,
                    request.event_id,
                    "reserve",
                    int(self._settings.reservation_ttl_s * 1000),
                    request.input_tokens,
                    reserved_output,
                    str(estimated_charge_picos),
                    plan.limits.token_basis.value,
                    base,
                    PURGE_PER_CALL,
                    *args,
                ],
            )
        except (RedisConnectionError, RedisTimeoutError) as exc:
            return self._without_redis(exc)
        self._redis_back()
        estimate = {
            "requests": 1,
            "tokens": plan.limits.token_basis.counted(request.input_tokens, reserved_output),
            "spend": estimated_charge_picos,
        }
        return self._decide(result, groups, plan.limits.token_basis, estimate, at)

    def _judge(
        self,
        result: Sequence[int],
        groups: Sequence[_Group],
        basis: TokenBasis,
        estimate: Mapping[str, int],
        at: datetime,
    ) -> tuple[list[_Judged], list[WindowRef], bool]:
        """Every limit's state from the script's numbers, in the order limits are judged;
        the windows absent; whether the credits are."""
        rank: dict[str, int] = {}
        for g in groups:
            rank.setdefault(g.scope, len(rank))
        judged: list[tuple[tuple[int, int], _Judged]] = []
        absent: list[WindowRef] = []
        credits_absent = False

        def add(
            limit: str,
            g: _Group,
            cap: int | None,
            used: int,
            what: str,
            *,
            retry: float,
            end: datetime | None = None,
            never: bool = False,
        ) -> None:
            if cap is not None:
                state = LimitState(limit, g.scope, used, cap, max(cap - used, 0), end)
                judged.append(
                    ((rank[g.scope], _ORDER[limit]), _Judged(state, estimate[what], retry, never))
                )

        offset = 1
        for g in groups:
            values = [int(v) for v in result[offset : offset + g.width]]
            offset += g.width
            lim = g.limits
            if g.kind == "m":
                requests, input_tokens, output_tokens, wait_r, wait_t = values
                tokens = basis.counted(input_tokens, output_tokens)
                never = wait_t == -2  # the estimate alone exceeds the cap
                add(
                    "requests_per_minute",
                    g,
                    lim.requests_per_minute,
                    requests,
                    "requests",
                    retry=wait_r / 1000,
                )
                add(
                    "tokens_per_minute",
                    g,
                    lim.tokens_per_minute,
                    tokens,
                    "tokens",
                    retry=60.0 if never else wait_t / 1000,
                    never=never,
                )
            elif g.kind == "c":
                present, dollars, picos, held_dollars, held_picos = values
                if not present:
                    credits_absent = True
                    continue
                spendable = dollars * PICOS_PER_USD + picos
                held = held_dollars * PICOS_PER_USD + held_picos
                add("credits", g, spendable, held, "spend", retry=0.0)
            elif g.kind == "f":
                add(
                    "in_flight",
                    g,
                    lim.max_in_flight,
                    values[0],
                    "requests",
                    retry=IN_FLIGHT_RETRY_S,
                )
            else:
                assert g.ref is not None
                present, requests, input_tokens, output_tokens, dollars, picos = values
                if not present:
                    absent.append(g.ref)
                    continue
                unit, end = g.ref.window.value, g.ref.end
                retry = max((end - at).total_seconds(), 0.0)
                caps = _window_caps(lim, g.ref.window)
                tokens = basis.counted(input_tokens, output_tokens)
                spend = dollars * PICOS_PER_USD + picos
                add("requests_per_day", g, caps[0], requests, "requests", retry=retry, end=end)
                add(f"tokens_per_{unit}", g, caps[1], tokens, "tokens", retry=retry, end=end)
                add(f"spend_per_{unit}", g, caps[2], spend, "spend", retry=retry, end=end)
        judged.sort(key=lambda item: item[0])
        return [j for _, j in judged], absent, credits_absent

    def _decide(
        self,
        result: Sequence[int],
        groups: Sequence[_Group],
        basis: TokenBasis,
        estimate: Mapping[str, int],
        at: datetime,
    ) -> Decision:
        status = int(result[0])
        judged, absent, credits_absent = self._judge(result, groups, basis, estimate, at)
        if status == 1:  # reserved: report what remains after this request
            states = [
                LimitState(
                    j.state.limit,
                    j.state.scope,
                    j.state.used + j.estimate,
                    j.state.cap,
                    max(j.state.cap - j.state.used - j.estimate, 0),
                    j.state.resets_at,
                )
                for j in judged
            ]
            return Decision(True, None, "allowed", limits=states)
        states = [j.state for j in judged]
        if status == 3:
            return Decision(True, None, "allowed: this event_id is already reserved", limits=states)
        if status == 2:
            names = [f"{_scope_label(r.scope)} {r.window_id}" for r in absent]
            names += ["the credits"] * credits_absent
            return Decision(
                False,
                None,
                f"counters not in Redis ({', '.join(names)}): rebuild them from the warehouse "
                "and the ledger, and ask again",
                limits=states,
                needs_rebuild=absent,
                needs_credits=credits_absent,
            )
        tripped = [j for j in judged if j.trips]
        if not tripped:  # cannot be: the script and this judge the same sums
            raise RuntimeError(f"check denied with every limit fitting: {result!r}")
        first = tripped[0]
        s = first.state
        what = s.limit.replace("_", " ")
        if s.limit == "credits":
            message = (
                f"insufficient credits: ${format_usd(s.remaining)} available "
                f"(${format_usd(s.cap)} less ${format_usd(s.used)} held by requests in "
                f"flight), this request needs up to ${format_usd(first.estimate)}; top up "
                "to go on"
            )
        elif first.never_fits:
            message = (
                f"{what} of {_scope_label(s.scope)}: this request alone "
                f"({_amount(s.limit, first.estimate)}) exceeds the cap of {_amount(s.limit, s.cap)}"
            )
        else:
            message = (
                f"{what} of {_scope_label(s.scope)}: {_amount(s.limit, s.used)} of "
                f"{_amount(s.limit, s.cap)} used, this request needs "
                f"{_amount(s.limit, first.estimate)}"
            )
        retry = max(j.retry_after_s for j in tripped)
        if retry:
            message += f"; retry in {retry:.1f} s"
        return Decision(
            False,
            _REASON_OF.get(s.limit, s.limit),
            message,
            retry_after_s=retry,
            limits=states,
            scope=s.scope,
        )

    def reserved_output(self, request: QuotaRequest) -> int:
        """The output tokens a check reserves: ``max_output_tokens`` up to
        ``max_reserved_output_tokens`` (all of that when the request sets none)."""
        most = self._settings.max_reserved_output_tokens
        asked = most if request.max_output_tokens is None else request.max_output_tokens
        return min(asked, most)

    def unavailable(self, why: str) -> Decision:
        """The answer when Redis cannot tell: allowed or denied as ``when_redis_down``
        says, reason ``redis_unavailable``."""
        allow = self._settings.when_redis_down == "allow"
        verdict = "allowed without a quota check" if allow else "denied"
        return Decision(allow, "redis_unavailable", f"{why}: {verdict}")

    def _without_redis(self, exc: Exception) -> Decision:
        if not self._redis_down:
            self._redis_down = True
            log.error(
                "quotas: Redis unreachable (%s); checks are %s until it is back",
                exc,
                "allowed" if self._settings.when_redis_down == "allow" else "denied",
            )
        return self.unavailable("Redis is unreachable")

    def _redis_back(self) -> None:
        if self._redis_down:
            self._redis_down = False
            log.info("quotas: Redis reachable again; checks count again")

    # -- settle, release ----------------------------------------------------------------

    async def settle(
        self,
        items: Sequence[tuple[Settlement, PlanVersion, str]],
        *,
        credits: Mapping[str, CreditState] | None = None,
        now: datetime | None = None,
    ) -> int:
        """Replace each event's reservation by what it used: (settlement, plan, timezone).

        An event without a reservation counts as it is; an event settled within
        ``settled_memory_s`` is not counted again. ``credits``: per prepaid account, its
        credits as the ledger said them after debiting these events; written in the
        same script call that frees their holds. One script call per account (per
        :data:`SETTLE_CHUNK` events), all in one pipeline. Returns the events applied.
        Redis errors are raised: the pipeline retries the batch, which is idempotent.
        """
        credits = credits or {}
        by_account: dict[str, list[tuple[Settlement, PlanVersion, str]]] = {}
        for item in items:
            by_account.setdefault(item[0].account_id, []).append(item)
        if not by_account and not credits:
            return 0
        clock = "" if now is None else _ms(now)
        async with self._redis.pipeline(transaction=False) as pipe:
            for account_id, account_items in by_account.items():
                for start in range(0, len(account_items), SETTLE_CHUNK):
                    keys, args = self._settle_layout(
                        account_id,
                        account_items[start : start + SETTLE_CHUNK],
                        credits.get(account_id) if start == 0 else None,
                    )
                    await self._settle(keys=keys, args=[clock, *args], client=pipe)
            applied = len(pipe)
            for account_id, state in credits.items():
                if account_id not in by_account:
                    await self._publish(state, clock, pipe)
            results = await pipe.execute()
        return sum(int(r) for r in results[:applied])

    def _credit_args(self, state: CreditState | None) -> list[str | int]:
        if state is None:
            return ["", "", "", ""]
        if state.spendable_picos < 0:
            raise ValueError(f"{state.account_id}: credits are not negative")
        return [
            state.version,
            str(state.spendable_picos),
            "" if state.changes_at is None else _ms(state.changes_at),
            int(CREDIT_REFRESH_S * 1000),
        ]

    async def _publish(
        self, state: CreditState, clock: str | int, pipe: redis.asyncio.client.Pipeline
    ) -> None:
        base = self._base(state.account_id)
        await self._credit_publish(
            keys=[f"{base}credit"], args=[clock, *self._credit_args(state)], client=pipe
        )

    async def publish_credits(
        self, states: Iterable[CreditState], *, now: datetime | None = None
    ) -> int:
        """Write the accounts' credits as the ledger said them, each unless a newer copy
        is there (a later posting's). Returns how many were written."""
        clock = "" if now is None else _ms(now)
        async with self._redis.pipeline(transaction=False) as pipe:
            for state in states:
                await self._publish(state, clock, pipe)
            results = await pipe.execute()
        return sum(int(r) for r in results)

    async def credit_holds(self, account_id: str) -> int:
        """What the account's requests in flight hold of its credits (pico-dollars)."""
        dollars, picos = await self._redis.hmget(f"{self._base(account_id)}hold", ["d", "p"])
        return int(dollars or 0) * PICOS_PER_USD + int(picos or 0)

    def _settle_layout(
        self,
        account_id: str,
        items: Sequence[tuple[Settlement, PlanVersion, str]],
        credit: CreditState | None,
    ) -> tuple[list[str], list[str | int]]:
        base = self._base(account_id)
        keys: list[str] = [f"{base}res", f"{base}settled", f"{base}credit"]
        args: list[str | int] = [
            int(self._settings.settled_memory_s * 1000),
            base,
            PURGE_PER_CALL,
            *self._credit_args(credit),
        ]
        for item, plan, timezone in items:
            if min(item.input_tokens, item.output_tokens, item.charge_picos) < 0:
                raise ValueError(f"event {item.event_id}: amounts are not negative")
            windows: list[str] = []
            logs: list[str] = []
            for scope, limits in request_scopes(plan, item.api_key_id, item.model):
                for window in (Window.DAY, Window.MONTH):
                    if _caps_window(limits, window):
                        ref = self._ref(scope, window, item.occurred_at, timezone)
                        windows.append(self._window_key(base, ref))
                if limits.requests_per_minute is not None or limits.tokens_per_minute is not None:
                    logs += [f"{base}min:{scope}", f"{base}mint:{scope}"]
            keys += [f"{base}r:{item.event_id}", *windows, *logs]
            args += [
                item.event_id,
                _ms(item.occurred_at),
                item.input_tokens,
                item.output_tokens,
                str(item.charge_picos),
                len(windows),
                len(logs) // 2,
            ]
        return keys, args

    async def forget_windows(self, account_ids: Iterable[str]) -> int:
        """Delete the accounts' day and month counters and credits, so that the next
        check rebuilds them from the warehouse and the ledger (settles were lost).
        Returns the keys deleted."""
        deleted = 0
        for account_id in account_ids:
            base = _glob_escape(self._base(account_id))
            for window in Window:
                keys = [k async for k in self._redis.scan_iter(match=f"{base}{window.value}:*")]
                if keys:
                    deleted += int(await self._redis.delete(*keys))
            deleted += int(await self._redis.delete(f"{self._base(account_id)}credit"))
        return deleted

    async def release(self, account_id: str, event_id: str) -> bool:
        """Free the reservation of a request that never ran. False: there was none
        (settled, released, expired, or never made)."""
        base = self._base(account_id)
        freed = await self._release(keys=[f"{base}res", f"{base}r:{event_id}"], args=[event_id])
        return bool(freed)

    # -- rebuild, report ----------------------------------------------------------------

    async def begin_rebuild(
        self, account_id: str, refs: Sequence[WindowRef], *, now: datetime | None = None
    ) -> list[int]:
        """Make each absent window of ``refs`` at zero, marked building since now; see
        :mod:`.rebuild`. Returns per window the instant (ms, Redis's clock) its building
        began, or 0 when it is complete (nothing to rebuild)."""
        if not refs:
            return []
        base = self._base(account_id)
        result = await self._rebuild_begin(
            keys=[f"{base}res", *(self._window_key(base, ref) for ref in refs)],
            args=[
                "" if now is None else _ms(now),
                base,
                *(_expiry_ms(ref.end) for ref in refs),
            ],
        )
        return [int(b) for b in result]

    async def finish_rebuild(
        self,
        account_id: str,
        plan: PlanVersion,
        builds: Sequence[tuple[WindowRef, int, WindowTotals]],
        recent: Sequence[RecentEvent] = (),
    ) -> int:
        """Complete windows being built: (window, building since as begin_rebuild said,
        the warehouse's totals). ``recent``: the events of those totals priced since
        :data:`REBUILD_LAG` before the building began, whose settle may come later or
        have come already. Returns the windows completed (0: another rebuild did)."""
        if not builds:
            return 0
        base = self._base(account_id)
        keys: list[str] = [f"{base}settled"]
        args: list[str | int] = []
        for ref, since, totals in builds:
            if min(totals.requests, totals.input_tokens, totals.output_tokens) < 0:
                raise ValueError(f"{ref.scope}: totals are not negative")
            if totals.charge_picos < 0:
                raise ValueError(f"{ref.scope}: totals are not negative")
            dollars, picos = divmod(totals.charge_picos, PICOS_PER_USD)
            keys.append(self._window_key(base, ref))
            args += [
                since,
                totals.requests,
                totals.input_tokens,
                totals.output_tokens,
                dollars,
                picos,
            ]
        for event in recent:
            scopes = {scope for scope, _ in request_scopes(plan, event.api_key_id, event.model)}
            among = [
                n
                for n, (ref, _, _) in enumerate(builds, start=1)
                if ref.scope in scopes and ref.start <= event.occurred_at < ref.end
            ]
            if among:
                args += [
                    event.event_id,
                    event.input_tokens,
                    event.output_tokens,
                    str(event.charge_picos),
                    len(among),
                    *among,
                ]
        return int(await self._rebuild_finish(keys=keys, args=args))

    async def set_window_totals(
        self,
        account_id: str,
        plan: PlanVersion,
        timezone: str,
        window: Window,
        at: datetime,
        scope_totals: Mapping[str, WindowTotals],
        *,
        now: datetime | None = None,
    ) -> None:
        """Set the absent counters of the ``window`` holding ``at`` to the warehouse's
        totals, one per scope ("account", "api_key:<id>", "model:<pattern>"), when no
        settle can be under way (tests, tools): :mod:`.rebuild` is the live path."""
        refs: list[WindowRef] = []
        for scope in scope_totals:
            if not _caps_window(self._scope_limits(plan, scope), window):
                raise ValueError(f"the plan {plan.plan_id} caps no {window.value} of {scope}")
            refs.append(self._ref(scope, window, at, timezone))
        since = await self.begin_rebuild(account_id, refs, now=now)
        builds = [
            (ref, b, scope_totals[ref.scope]) for ref, b in zip(refs, since, strict=True) if b
        ]
        await self.finish_rebuild(account_id, plan, builds)

    @staticmethod
    def _scope_limits(plan: PlanVersion, scope: str) -> Limits:
        kind, _, name = scope.partition(":")
        limits = plan.limits
        if scope == "account":
            return limits
        if kind == "api_key" and name and limits.per_api_key is not None:
            return limits.per_api_key
        if kind == "model" and name in limits.per_model:
            return limits.per_model[name]
        raise ValueError(f"the plan {plan.plan_id} has no scope {scope!r}")

    async def usage(
        self,
        account_id: str,
        plan: PlanVersion,
        timezone: str,
        *,
        api_key_id: str | None = None,
        model: str | None = None,
        now: datetime | None = None,
    ) -> list[LimitState]:
        """Every limit of the account now (and of ``api_key_id``'s and ``model``'s scopes,
        when given); reserves nothing.

        Raises:
            NeedsRebuild: a counter the plan caps is not in Redis.
        """
        at = now or datetime.now(UTC)
        groups = self._groups(plan, api_key_id, model, at, timezone)
        if not groups:
            return []
        base = self._base(account_id)
        keys, args = self._check_layout(base, groups, timezone)
        result = await self._check(
            keys=[f"{base}res", f"{base}r:", *keys],
            args=[
                "" if now is None else _ms(now),
                "",
                "peek",
                int(self._settings.reservation_ttl_s * 1000),
                0,
                0,
                "0",
                plan.limits.token_basis.value,
                base,
                PURGE_PER_CALL,
                *args,
            ],
        )
        estimate = {"requests": 0, "tokens": 0, "spend": 0}
        judged, absent, credits_absent = self._judge(
            result, groups, plan.limits.token_basis, estimate, at
        )
        if absent or credits_absent:
            raise NeedsRebuild(absent, credits_absent)
        return [j.state for j in judged]
