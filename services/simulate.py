"""``meterline simulate``: a gateway's worth of usage, sent over gRPC.

A seeded random mix of accounts, models, prompt-cache hits, reasoning and
latencies, reported in batches at a chosen rate. It prices what it sends with
the shipped catalog, so the totals it prints can be compared to the API's.
Account ids carry a run tag, so one run's usage can be looked up on its own.

If ingest stops answering (it went away, or refused a report), the run stops
there and still prints its totals: what was sent, what was acknowledged, and
what failed; ``SentTotals.error`` then says why, in one line.

With ``quota_target`` it also asks the QuotaService before each request, as a
gateway that enforces plans does: a denied request is not forwarded, so it is
not reported; the totals count the checks, and the denials by reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from meterline.accounts.grpc import key_channel
from meterline.catalog import Catalog, seed_versions
from meterline.lib.settings import IngestSettings
from meterline.money import format_usd
from meterline.tokens import TOKEN_FIELDS, TokenUsage
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, quota_pb2, quota_pb2_grpc, usage_pb2

#: (model as the gateway names it, provider, weight, reasoning model, cache kind)
TRAFFIC_MIX: tuple[tuple[str, str, int, bool, str], ...] = (
    ("openai/gpt-4.1-mini", "openai", 30, False, "auto"),
    ("gpt-4.1-mini", "azure", 8, False, "auto"),
    ("openai/gpt-4.1", "openai", 8, False, "auto"),
    ("openai/gpt-4o-mini", "openai", 10, False, "auto"),
    ("openai/o4-mini", "openai", 5, True, "auto"),
    ("openai/gpt-5-mini", "openai", 6, True, "auto"),
    ("anthropic/claude-sonnet-4.5", "anthropic", 12, False, "explicit"),
    ("anthropic/claude-haiku-4.5", "anthropic", 6, False, "explicit"),
    ("google/gemini-2.5-flash", "google", 10, False, "auto"),
    ("google/gemini-2.5-pro", "google", 3, True, "auto"),
    ("mistralai/mistral-large-2512", "mistral", 2, False, "none"),  # not in the catalog
)


#: The least max_output_tokens a simulated request sets; most clients set 256 or more.
MIN_MAX_OUTPUT_TOKENS = 256
#: Seconds a CheckQuota may take before the run gives up on the quota service.
CHECK_TIMEOUT_S = 10.0


@dataclass
class SentTotals:
    #: requests the gateway handled: reported, or denied by the quota service
    requests: int = 0
    #: events in the reports sent
    sent: int = 0
    #: events ingest answered for (accepted + rejected)
    events: int = 0
    #: events of reports that failed: they may or may not have been recorded
    failed: int = 0
    #: why the run stopped early, in one line; empty when it ran to the end
    error: str = ""
    accepted: int = 0
    rejected: int = 0
    unpriced: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    picos: int = 0
    per_account: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: CheckQuota answers (only with a quota target); allowed + denied == checked
    checked: int = 0
    allowed: int = 0
    denied: int = 0
    #: denials by the reason's name, e.g. {"requests_per_minute": 150}
    denied_reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class Gateway:
    """Makes usage events the way a busy gateway would see them."""

    def __init__(self, accounts: int, seed: int | None, run_tag: str) -> None:
        self.rng = random.Random(seed)
        self.accounts = [f"sim-{run_tag}-{i:03d}" for i in range(accounts)]
        # A few heavy accounts and a long tail, as real traffic has.
        self.account_weights = [1 / (i + 1) for i in range(accounts)]
        self.weights = [m[2] for m in TRAFFIC_MIX]

    def event(self) -> usage_pb2.UsageEvent:
        rng = self.rng
        model, provider, _, reasoning, cache = rng.choices(TRAFFIC_MIX, self.weights)[0]
        account = rng.choices(self.accounts, self.account_weights)[0]
        prompt = int(rng.lognormvariate(7.0, 1.2)) + 20  # median ~1.1k tokens
        output = int(rng.lognormvariate(5.5, 1.0)) + 1  # median ~250 tokens
        cached = write_5m = write_1h = 0
        if cache == "auto" and prompt >= 1024 and rng.random() < 0.45:
            cached = rng.randrange(1024, prompt + 1) // 128 * 128
        elif cache == "explicit" and rng.random() < 0.5:
            cached = int(prompt * rng.uniform(0.5, 0.95))
            if rng.random() < 0.3:
                write_5m = (prompt - cached) // 2
            elif rng.random() < 0.1:
                write_1h = (prompt - cached) // 2
        reasoning_tokens = int(output * rng.uniform(0.3, 0.8)) if reasoning else 0
        ttft = int(rng.lognormvariate(6.5, 0.5))
        latency = ttft + int(output * rng.uniform(4, 12))
        status = (
            usage_pb2.REQUEST_STATUS_OK if rng.random() > 0.02 else usage_pb2.REQUEST_STATUS_ERROR
        )
        occurred = Timestamp()
        occurred.FromDatetime(datetime.now(UTC))
        return usage_pb2.UsageEvent(
            event_id=str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            occurred_at=occurred,
            account_id=account,
            api_key_id=f"key-{account[-3:]}-{rng.randrange(3)}",
            model=model,
            provider=provider,
            input_tokens=prompt,
            cached_input_tokens=cached,
            cache_write_5m_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
            output_tokens=output,
            reasoning_tokens=reasoning_tokens,
            latency_ms=latency,
            ttft_ms=ttft,
            status=status,
        )


def token_usage(event: usage_pb2.UsageEvent) -> TokenUsage:
    """The token counts of a wire event."""
    return TokenUsage(
        input_tokens=event.input_tokens,
        cached_input_tokens=event.cached_input_tokens,
        cache_write_5m_tokens=event.cache_write_5m_tokens,
        cache_write_1h_tokens=event.cache_write_1h_tokens,
        output_tokens=event.output_tokens,
        reasoning_tokens=event.reasoning_tokens,
    )


def max_output_tokens(output_tokens: int) -> int:
    """The max_tokens a client would have set for a reply of ``output_tokens``: the next
    power of two, at least :data:`MIN_MAX_OUTPUT_TOKENS` (a cap is set before the reply
    is known, so it is above what was used)."""
    return max(MIN_MAX_OUTPUT_TOKENS, 1 << max(output_tokens - 1, 0).bit_length())


def check_request(event: usage_pb2.UsageEvent) -> quota_pb2.CheckQuotaRequest:
    """What a gateway asks before forwarding the request ``event`` will report."""
    return quota_pb2.CheckQuotaRequest(
        account_id=event.account_id,
        api_key_id=event.api_key_id,
        model=event.model,
        provider=event.provider,
        input_tokens=event.input_tokens,
        max_output_tokens=max_output_tokens(event.output_tokens),
        event_id=event.event_id,
    )


def reason_name(reason: quota_pb2.DenyReason.ValueType) -> str:
    """DENY_REASON_REQUESTS_PER_MINUTE -> "requests_per_minute", as the engine names it."""
    return quota_pb2.DenyReason.Name(reason).removeprefix("DENY_REASON_").lower()


class QuotaFailed(Exception):
    """The quota service failed a check: the run stops, as when ingest fails a report."""


class QuotaGate:
    """Asks the QuotaService before each request, as a gateway that enforces plans does.

    The checks of a batch go out at once (``asyncio.gather``), so a batch costs one
    round trip, not one per event, and the simulator keeps its rate.
    """

    def __init__(self, channel: grpc.aio.Channel, target: str) -> None:
        self.stub = quota_pb2_grpc.QuotaServiceStub(channel)
        self.target = target

    async def admit(
        self, events: list[usage_pb2.UsageEvent], totals: SentTotals
    ) -> list[usage_pb2.UsageEvent]:
        """The events whose requests are allowed; the answers are counted in ``totals``.

        Raises:
            QuotaFailed: a check got no answer. The batch is not sent, and what this
                batch reserved is released: those requests never ran.
        """
        answers = await asyncio.gather(
            *(self.stub.CheckQuota(check_request(e), timeout=CHECK_TIMEOUT_S) for e in events),
            return_exceptions=True,
        )
        allowed: list[usage_pb2.UsageEvent] = []
        failure: grpc.aio.AioRpcError | None = None
        for event, answer in zip(events, answers, strict=True):
            if isinstance(answer, grpc.aio.AioRpcError):
                failure = failure or answer
                continue
            if isinstance(answer, BaseException):
                raise answer
            totals.checked += 1
            if answer.allowed:
                totals.allowed += 1
                allowed.append(event)
            else:
                totals.denied += 1
                totals.denied_reasons[reason_name(answer.reason)] += 1
        if failure is not None:
            await self._release(allowed)
            raise QuotaFailed(_one_line(f"quota at {self.target} failed a check", failure))
        return allowed

    async def _release(self, events: list[usage_pb2.UsageEvent]) -> None:
        """Best effort: a reservation not released frees itself on expiry anyway."""
        await asyncio.gather(
            *(
                self.stub.ReleaseQuota(
                    quota_pb2.ReleaseQuotaRequest(account_id=e.account_id, event_id=e.event_id),
                    timeout=CHECK_TIMEOUT_S,
                )
                for e in events
            ),
            return_exceptions=True,
        )


async def simulate(
    target: str,
    *,
    rate: float,
    duration_s: float,
    accounts: int,
    batch_size: int,
    seed: int | None,
    console: Console | None = None,
    max_message_bytes: int | None = None,
    key: str | None = None,
    quota_target: str | None = None,
    run_tag: str | None = None,
) -> SentTotals:
    """Send ``rate`` events/s for ``duration_s`` to the ingest service at ``target``.

    ``max_message_bytes`` is the largest report sent (default: ingest's
    ``METERLINE_GRPC_MAX_MESSAGE_BYTES``, so a report ingest would refuse
    fails here, before it is sent). ``key`` is the service key every report
    presents (None: none, for an ingest run with METERLINE_AUTH=off).
    ``quota_target``: the QuotaService to ask before each request (with the
    same key); a denied request is not reported. None: no checks.
    ``run_tag``: the accounts are ``sim-<run_tag>-000`` and on (default: a
    new random tag, so a run's usage can be looked up on its own; give one to
    simulate accounts that exist already, e.g. on a plan).
    Returns the totals, also when ingest failed a report or the quota service
    a check: ``error`` then says why the run stopped.
    """
    console = console or Console()
    run_tag = run_tag or uuid.uuid4().hex[:6]
    gateway = Gateway(accounts, seed, run_tag)
    catalog = Catalog(seed_versions())
    totals = SentTotals()
    total_events = max(1, int(rate * duration_s))
    limit = max_message_bytes or IngestSettings().max_message_bytes
    options = [
        ("grpc.max_send_message_length", limit),
        # one result per event comes back: as large as a report, at most
        ("grpc.max_receive_message_length", limit),
    ]
    gate: QuotaGate | None = None
    started = time.monotonic()
    try:
        async with contextlib.AsyncExitStack() as channels:
            channel = await channels.enter_async_context(key_channel(target, key, options=options))
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            if quota_target is not None:
                quota_channel = await channels.enter_async_context(key_channel(quota_target, key))
                gate = QuotaGate(quota_channel, quota_target)
            with Progress(
                TextColumn("[bold]simulating[/] {task.completed}/{task.total} events"),
                BarColumn(),
                TextColumn("{task.fields[accepted]} accepted"),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("send", total=total_events, accepted=0)
                while totals.requests < total_events:
                    events = [
                        gateway.event()
                        for _ in range(min(batch_size, total_events - totals.requests))
                    ]
                    totals.requests += len(events)
                    if gate is not None:
                        try:
                            events = await gate.admit(events, totals)
                        except QuotaFailed as exc:
                            totals.error = str(exc)
                            break
                    if events:  # all of a batch may be denied: nothing to report then
                        totals.sent += len(events)
                        try:
                            response = await stub.ReportUsage(
                                ingest_pb2.ReportUsageRequest(events=events), timeout=30
                            )
                        except grpc.aio.AioRpcError as exc:
                            totals.failed += len(events)
                            totals.error = _one_line(f"ingest at {target} failed a report", exc)
                            break
                        for event, result in zip(events, response.results, strict=True):
                            _count(totals, catalog, event, result)
                    progress.update(
                        task, completed=totals.events + totals.denied, accepted=totals.accepted
                    )
                    # Pace to the requested rate: sleep until this batch is due.
                    due = started + totals.requests / rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:  # Ctrl-C too: the totals so far are what the user needs
        _report(console, totals, run_tag, time.monotonic() - started, checked=gate is not None)
    return totals


def _one_line(what: str, exc: grpc.aio.AioRpcError) -> str:
    """Why a call failed, in one line: the status and gRPC's first line of details."""
    details = (exc.details() or "").strip().splitlines()
    reason = details[0] if details else "no details"
    return f"{what}: {exc.code().name} ({reason})"


def _count(
    totals: SentTotals,
    catalog: Catalog,
    event: usage_pb2.UsageEvent,
    result: ingest_pb2.EventResult,
) -> None:
    totals.events += 1
    if not result.accepted:
        totals.rejected += 1
        totals.reasons[result.reason] += 1
        return
    totals.accepted += 1
    usage = token_usage(event)
    for name in TOKEN_FIELDS:
        totals.tokens[name] += getattr(usage, name)
    price = catalog.price_for(event.model, event.provider, event.occurred_at.ToDatetime(tzinfo=UTC))
    if price is None:
        totals.unpriced += 1
        return
    picos = price.cost(usage).picos
    totals.picos += picos
    totals.per_account[event.account_id] += picos


def _report(
    console: Console, totals: SentTotals, run_tag: str, elapsed: float, *, checked: bool
) -> None:
    rate = totals.events / elapsed if elapsed > 0 else 0.0
    table = Table(title=f"sent in {elapsed:.1f} s ({rate:.0f} events/s acknowledged)")
    table.add_column("what")
    table.add_column("value", justify="right")
    if checked:
        table.add_row("requests checked (CheckQuota)", str(totals.checked))
        table.add_row("requests allowed", str(totals.allowed))
        table.add_row("requests denied (not sent)", str(totals.denied))
    table.add_row("events sent", str(totals.sent))
    table.add_row("events acknowledged", str(totals.events))
    if totals.failed:
        table.add_row("events in failed reports (maybe recorded)", str(totals.failed))
    table.add_row("events accepted", str(totals.accepted))
    table.add_row("events rejected", str(totals.rejected))
    table.add_row("of which unpriced (no catalog price)", str(totals.unpriced))
    for name, count in totals.tokens.items():
        table.add_row(name, f"{count:,}")
    table.add_row("expected cost (seed catalog)", f"${format_usd(totals.picos)}")
    console.print(table)
    for reason, count in totals.reasons.items():
        console.print(f"[red]rejected {count}×[/]: {reason}")
    if totals.denied:
        console.print("denied by quota, by reason:")
        for name, count in sorted(totals.denied_reasons.items(), key=lambda kv: -kv[1]):
            console.print(f"  {name} {count}")
    if totals.per_account:
        account, picos = max(totals.per_account.items(), key=lambda kv: kv[1])
        console.print(
            f"Accounts are sim-{run_tag}-000 .. ; the busiest, {account}, should cost "
            f"${format_usd(picos)}:\n"
            '  curl -H "Authorization: Bearer $ADMIN" '
            f"'http://127.0.0.1:8000/v1/accounts/{account}/usage?group_by=model'\n"
            "(ADMIN: the admin key, e.g. from <data dir>/keys.json)"
        )
