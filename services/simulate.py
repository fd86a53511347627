"""``meterline simulate``: a gateway's worth of usage, sent over gRPC.

A seeded random mix of accounts, models, prompt-cache hits, reasoning and
latencies, reported in batches at a chosen rate. It prices what it sends with
the shipped catalog, so the totals it prints can be compared to the API's.
Account ids carry a run tag, so one run's usage can be looked up on its own.

If ingest stops answering (it went away, or refused a report), the run stops
there and still prints its totals: what was sent, what was acknowledged, and
what failed; ``SentTotals.error`` then says why, in one line.
"""

from __future__ import annotations

import asyncio
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
from meterline.v1 import ingest_pb2, ingest_pb2_grpc, usage_pb2

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


@dataclass
class SentTotals:
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
) -> SentTotals:
    """Send ``rate`` events/s for ``duration_s`` to the ingest service at ``target``.

    ``max_message_bytes`` is the largest report sent (default: ingest's
    ``METERLINE_GRPC_MAX_MESSAGE_BYTES``, so a report ingest would refuse
    fails here, before it is sent). ``key`` is the service key every report
    presents (None: none, for an ingest run with METERLINE_AUTH=off).
    Returns the totals, also when ingest failed a report: ``error`` then
    says why the run stopped.
    """
    console = console or Console()
    run_tag = uuid.uuid4().hex[:6]
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
    started = time.monotonic()
    try:
        async with key_channel(target, key, options=options) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            with Progress(
                TextColumn("[bold]simulating[/] {task.completed}/{task.total} events"),
                BarColumn(),
                TextColumn("{task.fields[accepted]} accepted"),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("send", total=total_events, accepted=0)
                while totals.sent < total_events:
                    events = [
                        gateway.event() for _ in range(min(batch_size, total_events - totals.sent))
                    ]
                    totals.sent += len(events)
                    try:
                        response = await stub.ReportUsage(
                            ingest_pb2.ReportUsageRequest(events=events), timeout=30
                        )
                    except grpc.aio.AioRpcError as exc:
                        totals.failed += len(events)
                        totals.error = _one_line(target, exc)
                        break
                    for event, result in zip(events, response.results, strict=True):
                        _count(totals, catalog, event, result)
                    progress.update(task, completed=totals.events, accepted=totals.accepted)
                    # Pace to the requested rate: sleep until this batch is due.
                    due = started + totals.sent / rate
                    await asyncio.sleep(max(0.0, due - time.monotonic()))
    finally:  # Ctrl-C too: the totals so far are what the user needs
        _report(console, totals, run_tag, time.monotonic() - started)
    return totals


def _one_line(target: str, exc: grpc.aio.AioRpcError) -> str:
    """Why a report failed, in one line: the status and gRPC's first line of details."""
    details = (exc.details() or "").strip().splitlines()
    reason = details[0] if details else "no details"
    return f"ingest at {target} failed a report: {exc.code().name} ({reason})"


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


def _report(console: Console, totals: SentTotals, run_tag: str, elapsed: float) -> None:
    rate = totals.events / elapsed if elapsed > 0 else 0.0
    table = Table(title=f"sent in {elapsed:.1f} s ({rate:.0f} events/s acknowledged)")
    table.add_column("what")
    table.add_column("value", justify="right")
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
    if totals.per_account:
        account, picos = max(totals.per_account.items(), key=lambda kv: kv[1])
        console.print(
            f"Accounts are sim-{run_tag}-000 .. ; the busiest, {account}, should cost "
            f"${format_usd(picos)}:\n"
            '  curl -H "Authorization: Bearer $ADMIN" '
            f"'http://127.0.0.1:8000/v1/accounts/{account}/usage?group_by=model'\n"
            "(ADMIN: the admin key, e.g. from <data dir>/keys.json)"
        )
