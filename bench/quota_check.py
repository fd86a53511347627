"""CheckQuota latency and throughput of one quota server, beside a no-op RPC on it.

Run by hand, not in CI::

    .venv/bin/python bench/quota_check.py [--concurrency 1 16 64] [--seconds 5] [--rounds 5]

Makes a PostgreSQL database of its own (``bench_quota_<random>`` on ``--postgres``'s
server, dropped at the end) with ``--accounts`` accounts on one plan that caps requests
and tokens a minute (far above what the run sends, so nothing is denied), tokens a day,
spend a month, and each API key's requests a minute and tokens a day; so every check
runs the whole script: minute logs, day and month windows, a reservation. It issues one
service key (the gateway's), then starts ONE server process (this script with
``--serve``): a :class:`QuotaDesk` on Redis (``--redis``, keys under a prefix of this
run's, deleted at the end) and an embedded chDB warehouse in a temp dir, behind a
:class:`QuotaServer` with the key ring as its authenticator, as ``meterline up`` builds
them. The load client is this process (grpc.aio, one channel that presents the key), so
it does not share the server's interpreter lock.

Two workloads on the same server, at the same number of calls in flight, alternated
round by round (ABBA, so drift hits both alike): ``CheckQuota`` (spread over the
accounts and four API keys each, a new event_id each call, so each reserves) and
``grpc.health.v1.Health/Check``, the no-op baseline: served by the same grpc.aio server
through the same interceptor, which lets it pass without the API-key check that
CheckQuota pays. Figures are client-side p50, p99 and calls/s per round, and their
medians over ``--rounds``; the ratios are CheckQuota over no-op.

Where a check's time goes, measured in the server process during the CheckQuota rounds:
the authenticator's call, ``QuotaDesk.check`` and, inside it, the awaited EVALSHA; CPU
per call of the server, this client and Redis; and a third workload, ``desk alone``:
``QuotaDesk.check`` called straight from the server's loop at the same concurrency (no
gRPC, no auth, no protobuf). ``--profile DIR`` adds one round of each workload per
concurrency under ``py-spy record --gil`` (py-spy must be installed; raw stacks are left
in DIR) and gives the server's GIL time a call by part: auth, the desk's Python,
redis-py, protobuf, the handler, the loop's C and Cython callbacks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import psycopg
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from redis.commands.core import AsyncScript

from meterline.accounts import Authenticator, KeyKind, KeyRing
from meterline.accounts.grpc import key_channel
from meterline.accounts.keys import KeyHasher
from meterline.accounts.manage import Accounts
from meterline.accounts.model import Principal
from meterline.accounts.postgres import PostgresAccountStore
from meterline.catalog import PriceBook
from meterline.credits.postgres import PostgresLedger
from meterline.lib.postgres import open_database
from meterline.lib.redis_server import connect_redis
from meterline.lib.settings import PostgresSettings, QuotaSettings
from meterline.lib.warehouse.chdb import ChdbWarehouse
from meterline.lib.warehouse.schema import migrate
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.engine import QuotaRequest
from meterline.quotas.plans import Limits, PlanLimits, PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from meterline.v1 import quota_pb2, quota_pb2_grpc
from services.quota.server import QuotaServer

PLAN_ID = "bench-quota"
#: the gateway's own keys of each account (the checks' api_key_id)
API_KEYS = tuple(f"gw-key-{i}" for i in range(4))
MODEL, PROVIDER = "openai/gpt-4.1-mini", "openai"
INPUT_TOKENS, MAX_OUTPUT_TOKENS = 1_200, 800
LIMITS = PlanLimits(
    requests_per_minute=10**9,
    tokens_per_minute=10**13,
    tokens_per_day=10**14,
    spend_per_month_usd=Decimal(1_000_000),
    per_api_key=Limits(requests_per_minute=10**9, tokens_per_day=10**14),
)


def account_ids(count: int) -> list[str]:
    return [f"acct-bench-quota-{i:03d}" for i in range(count)]


class Setup(NamedTuple):
    """What the server process needs, sent on its stdin."""

    postgres: str
    secret: str
    redis: str
    key_prefix: str
    data_dir: str
    accounts: int


@dataclass(frozen=True)
class Spread:
    """Latencies of one kind: p50, p99, mean in µs, and how many."""

    p50: float
    p99: float
    mean: float
    count: int

    @staticmethod
    def of(us: Sequence[float]) -> Spread:
        if len(us) < 2:
            return Spread(float("nan"), float("nan"), float("nan"), len(us))
        return Spread(
            statistics.median(us),
            statistics.quantiles(us, n=100)[98],
            statistics.fmean(us),
            len(us),
        )


# --- the server process --------------------------------------------------------------


class TimedAuthenticator:
    """The key ring, noting how long each ``authenticate`` takes (ns)."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner
        self.ns: list[int] = []

    def authenticate(self, key: str | None) -> Principal:
        started = time.perf_counter_ns()
        try:
            return self.inner.authenticate(key)
        finally:
            self.ns.append(time.perf_counter_ns() - started)


class TimedScript(AsyncScript):
    """The engine's check script, noting how long each awaited call takes (ns): the
    round trip to Redis, its run there, the reply's parsing, and the wait for the loop."""

    def __init__(self, inner: AsyncScript, ns: list[int]) -> None:  # no super(): a wrapper
        self.inner = inner
        self.ns = ns

    async def __call__(self, keys: Any = None, args: Any = None, client: Any = None) -> Any:
        started = time.perf_counter_ns()
        try:
            return await self.inner(keys=keys, args=args, client=client)
        finally:
            self.ns.append(time.perf_counter_ns() - started)


class TimedDesk(QuotaDesk):
    """The desk, noting how long each ``check`` takes (ns), and its script's calls."""

    def timed(self) -> TimedDesk:
        self.check_ns: list[int] = []
        self.script_ns: list[int] = []
        self.engine._check = TimedScript(self.engine._check, self.script_ns)
        return self

    async def check(self, request: QuotaRequest, *, now: datetime | None = None) -> Any:
        started = time.perf_counter_ns()
        try:
            return await super().check(request, now=now)
        finally:
            self.check_ns.append(time.perf_counter_ns() - started)


def _spread_ns(ns: list[int]) -> dict[str, Any]:
    spread = asdict(Spread.of([n / 1000 for n in ns]))
    ns.clear()
    return spread


class Requests:
    """CheckQuota requests over the accounts and their keys, each with a new event_id."""

    def __init__(self, accounts: int, tag: str) -> None:
        self.pairs = [(a, k) for a in account_ids(accounts) for k in API_KEYS]
        self.tag = f"{tag}-{secrets.token_hex(4)}"
        self.n = 0

    def next(self) -> tuple[str, str, str]:
        self.n += 1
        account, key = self.pairs[self.n % len(self.pairs)]
        return account, key, f"{self.tag}-{self.n}"


async def desk_alone(desk: TimedDesk, accounts: int, concurrency: int, seconds: float) -> Any:
    """``desk.check`` straight from this loop, ``concurrency`` at a time: µs a call."""
    source = Requests(accounts, "alone")
    spent: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            account, key, event_id = source.next()
            asked = QuotaRequest(
                account, key, MODEL, PROVIDER, INPUT_TOKENS, MAX_OUTPUT_TOKENS, event_id
            )
            started = time.perf_counter()
            decision = await desk.check(asked)
            spent.append((time.perf_counter() - started) * 1e6)
            if not decision.allowed:
                raise RuntimeError(f"denied: {decision.message}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    desk.check_ns.clear()
    desk.script_ns.clear()
    return {"latency": asdict(Spread.of(spent)), "rate": len(spent) / elapsed}


async def serve(setup: Setup) -> None:
    """The quota server, until stdin closes; answers one JSON line to each command line.

    Commands: ``stats`` (timings since the last stats: authenticate, desk.check, the
    script), ``alone CONCURRENCY SECONDS`` (the desk without gRPC).
    """
    with open_database(setup.postgres, PostgresSettings(url=setup.postgres)) as database:
        warehouse = ChdbWarehouse(Path(setup.data_dir) / "chdb")
        migrate(warehouse)
        PriceBook(warehouse).seed_if_empty()
        store = PostgresAccountStore(database)
        ring = KeyRing(store, KeyHasher(setup.secret.encode()))
        await asyncio.to_thread(ring.load)
        stop = asyncio.Event()
        refreshing = asyncio.create_task(ring.run(stop))  # as a running service does
        client = await connect_redis(setup.redis)
        settings = QuotaSettings(host="127.0.0.1", port=0)
        desk = TimedDesk(
            client,
            key_prefix=setup.key_prefix,
            settings=settings,
            accounts=store,
            plans=PostgresPlanStore(database),
            ledger=PostgresLedger(database),
            warehouse=warehouse,
        ).timed()
        auth = TimedAuthenticator(ring)
        server: QuotaServer | None = None
        try:
            await desk.start()
            server = QuotaServer(desk, settings=settings, auth=auth)
            await server.start()
            print(
                json.dumps({"port": int(server.address.rpartition(":")[2]), "pid": os.getpid()}),
                flush=True,
            )
            while line := await asyncio.to_thread(sys.stdin.readline):
                command, *words = line.split()
                answer: Any
                if command == "stats":
                    answer = {
                        "auth": _spread_ns(auth.ns),
                        "desk": _spread_ns(desk.check_ns),
                        "script": _spread_ns(desk.script_ns),
                    }
                elif command == "alone":
                    answer = await desk_alone(desk, setup.accounts, int(words[0]), float(words[1]))
                else:
                    answer = {"error": f"unknown command {command!r}"}
                print(json.dumps(answer), flush=True)
        finally:
            if server is not None:
                await server.stop()
            await desk.close()
            await client.aclose()
            stop.set()
            await refreshing
            warehouse.close()


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    port: int
    pid: int

    def ask(self, command: str) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process ended (exit code {self.process.wait()})")
        return json.loads(line)


@contextlib.contextmanager
def server_process(setup: Setup) -> Iterator[ServerProcess]:
    """This script with ``--serve``; stopped by closing its stdin, killed if it lingers."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(json.dumps(setup._asdict()) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the server process ended (exit code {process.wait()})")
        started = json.loads(line)
        yield ServerProcess(process, started["port"], started["pid"])
    finally:
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- the client: this process --------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisCounters(NamedTuple):
    cpu_s: float
    evalsha_calls: int
    evalsha_us: int

    @staticmethod
    def read(client: redis.Redis) -> RedisCounters:
        cpu = client.info("cpu")
        stats = client.info("commandstats").get("cmdstat_evalsha", {})
        return RedisCounters(
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
            int(stats.get("calls", 0)),
            int(stats.get("usec", 0)),
        )


@dataclass
class Round:
    """One timed round of one workload, as the client saw it."""

    workload: str
    latency: Spread  # µs
    rate: float
    server_cpu_us: float  # a call
    client_cpu_us: float
    redis_cpu_us: float
    evalsha_us: float  # in Redis, a call (INFO commandstats): the script's run
    inside: dict[str, Any] = field(default_factory=dict)  # the server's own timings


async def load(
    call: Callable[[int], Awaitable[None]], concurrency: int, seconds: float
) -> tuple[list[float], float]:
    """``call`` by ``concurrency`` workers for ``seconds``: each call's µs, and elapsed s."""
    spent: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call(w)
            spent.append((time.perf_counter() - started) * 1e6)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return spent, time.perf_counter() - started


class Client:
    """The two workloads on one channel to the server."""

    def __init__(self, channel: grpc.aio.Channel, accounts: int) -> None:
        self.quota = quota_pb2_grpc.QuotaServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)
        self.requests = Requests(accounts, "check")
        self.denied = 0

    async def check(self, _: int) -> None:
        account, key, event_id = self.requests.next()
        response = await self.quota.CheckQuota(
            quota_pb2.CheckQuotaRequest(
                account_id=account,
                api_key_id=key,
                model=MODEL,
                provider=PROVIDER,
                input_tokens=INPUT_TOKENS,
                max_output_tokens=MAX_OUTPUT_TOKENS,
                event_id=event_id,
            )
        )
        if not response.allowed:
            raise RuntimeError(f"denied: {response.message}")

    async def noop(self, _: int) -> None:
        response = await self.health.Check(health_pb2.HealthCheckRequest(service=""))
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health: {response.status}")


async def timed_round(
    workload: str,
    call: Callable[[int], Awaitable[None]],
    server: ServerProcess,
    counters: redis.Redis,
    concurrency: int,
    seconds: float,
) -> Round:
    server.ask("stats")  # forget what came before
    cpu0, client0, redis0 = (
        cpu_seconds(server.pid),
        time.process_time(),
        RedisCounters.read(counters),
    )
    spent, elapsed = await load(call, concurrency, seconds)
    cpu1, client1, redis1 = (
        cpu_seconds(server.pid),
        time.process_time(),
        RedisCounters.read(counters),
    )
    n = len(spent)
    evalsha = redis1.evalsha_calls - redis0.evalsha_calls
    return Round(
        workload,
        Spread.of(spent),
        n / elapsed,
        (cpu1 - cpu0) / n * 1e6,
        (client1 - client0) / n * 1e6,
        (redis1.cpu_s - redis0.cpu_s) / n * 1e6,
        (redis1.evalsha_us - redis0.evalsha_us) / evalsha if evalsha else float("nan"),
        server.ask("stats"),
    )


def alone_round(
    server: ServerProcess, counters: redis.Redis, concurrency: int, seconds: float
) -> Round:
    cpu0, redis0 = cpu_seconds(server.pid), RedisCounters.read(counters)
    answer = server.ask(f"alone {concurrency} {seconds}")
    cpu1, redis1 = cpu_seconds(server.pid), RedisCounters.read(counters)
    latency = Spread(**answer["latency"])
    n = latency.count
    evalsha = redis1.evalsha_calls - redis0.evalsha_calls
    return Round(
        "desk alone",
        latency,
        answer["rate"],
        (cpu1 - cpu0) / n * 1e6,
        0.0,
        (redis1.cpu_s - redis0.cpu_s) / n * 1e6,
        (redis1.evalsha_us - redis0.evalsha_us) / evalsha if evalsha else float("nan"),
    )


@dataclass
class Run:
    concurrency: int
    rounds: list[Round] = field(default_factory=list)
    #: workload -> part of the server -> µs of GIL a call
    profile: dict[str, dict[str, float]] = field(default_factory=dict)

    def of(self, workload: str) -> list[Round]:
        return [r for r in self.rounds if r.workload == workload]


#: (where a frame's file is, the part of the server it is), the first that matches
PARTS = (
    ("/meterline/accounts/grpc.py", "AuthInterceptor (meterline/accounts/grpc.py)"),
    ("/meterline/accounts/", "KeyRing.authenticate (meterline/accounts)"),
    ("/meterline/", "desk + engine + pricing Python (meterline/quotas, ...)"),
    ("/prometheus_client/", "prometheus_client (the handler's metrics)"),
    ("/google/protobuf/", "protobuf Python (Timestamp, Duration)"),
    ("/services/quota/", "CheckQuota handler (services/quota/server.py)"),
    ("/redis/", "redis-py client"),
    ("/grpc_health/", "Health servicer"),
    ("/grpc/", "grpc Python"),
)


def categorize(stack: Sequence[str]) -> str:
    """The part of the server a py-spy stack (root first, frames ``function (file:line)``)
    belongs to: that of its innermost frame of a known place; else the loop's own."""
    for frame in reversed(stack):
        where = "/" + frame.rpartition("(")[2]
        for needle, part in PARTS:
            if needle in where:
                return part
    leaf = "/" + stack[-1].rpartition("(")[2] if stack else ""
    if "/asyncio/events.py" in leaf:
        return "event loop callbacks: C and Cython (grpc aio + core, C tasks)"
    if "/asyncio/" in leaf or "/selectors.py" in leaf:
        return "asyncio Python (loop, tasks, streams, epoll)"
    return f"other ({leaf.lstrip('/').split(':')[0]})"


async def profiled_round(
    call: Callable[[int], Awaitable[None]],
    name: str,
    server: ServerProcess,
    concurrency: int,
    seconds: float,
    out: Path,
) -> dict[str, float]:
    """One round of ``call`` under ``py-spy record --gil``: µs the server's GIL was held
    a call, by the part of the server the sampled stack was in."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = out / f"{name}_c{concurrency}.txt"
    rate = 500
    command = [py_spy, "record", "--gil", "--nonblocking", "--rate", str(rate), "--format", "raw"]
    spy = subprocess.Popen(
        [*command, "--output", str(raw), "--pid", str(server.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.sleep(1.0)  # attached
        spent, _ = await load(call, concurrency, seconds)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)
    parts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            parts[categorize(stack.split(";"))] += int(count)
    us_a_sample = 1e6 / rate / len(spent)
    return {part: n * us_a_sample for part, n in parts.most_common()}


async def run_concurrency(
    target: str,
    key: str,
    server: ServerProcess,
    counters: redis.Redis,
    args: argparse.Namespace,
    concurrency: int,
) -> Run:
    run = Run(concurrency)
    async with key_channel(target, key) as channel:
        client = Client(channel, args.accounts)
        # warm: every account's terms read and its counters rebuilt, the pools grown
        await load(client.check, concurrency, args.warmup)
        await load(client.noop, concurrency, args.warmup / 2)
        workloads = [("CheckQuota", client.check), ("no-op", client.noop)]
        for i in range(args.rounds):
            order = workloads if i % 2 == 0 else workloads[::-1]
            for name, call in order:
                run.rounds.append(
                    await timed_round(name, call, server, counters, concurrency, args.seconds)
                )
            run.rounds.append(alone_round(server, counters, concurrency, args.seconds))
            print(f"  c={concurrency}: round {i + 1} of {args.rounds} done", file=sys.stderr)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            for name, call in workloads:
                run.profile[name] = await profiled_round(
                    call, name, server, concurrency, args.seconds, args.profile
                )
    return run


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def print_run(run: Run) -> None:
    checks, noops, alone = run.of("CheckQuota"), run.of("no-op"), run.of("desk alone")
    print(f"\n### {run.concurrency} calls in flight")
    print(
        f"{'round':>5} {'workload':<11} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>8} "
        f"{'srv CPU':>8} {'cli CPU':>8} {'redis CPU':>9} {'evalsha':>8}  (CPU: µs a call)"
    )
    for i, r in enumerate(run.rounds):
        print(
            f"{i // 3 + 1:>5} {r.workload:<11} {r.latency.p50 / 1000:8.3f} "
            f"{r.latency.p99 / 1000:8.3f} {r.rate:8.0f} {r.server_cpu_us:8.0f} "
            f"{r.client_cpu_us:8.0f} {r.redis_cpu_us:9.0f} {r.evalsha_us:8.1f}"
        )
    print(f"\nmedians of {len(checks)} rounds   CheckQuota    no-op   ratio   desk alone")
    measures: list[tuple[str, Callable[[Round], float]]] = [
        ("p50 ms", lambda r: r.latency.p50 / 1000),
        ("p99 ms", lambda r: r.latency.p99 / 1000),
        ("calls/s", lambda r: r.rate),
        ("server CPU µs/call", lambda r: r.server_cpu_us),
        ("client CPU µs/call", lambda r: r.client_cpu_us),
        ("Redis CPU µs/call", lambda r: r.redis_cpu_us),
    ]
    for label, get in measures:
        c, n, a = (median(get(r) for r in rounds) for rounds in (checks, noops, alone))
        print(f"{label:<25} {c:10.3f} {n:8.3f} {c / n:7.2f} {a:10.3f}")
    paired = [c.latency.p99 / n.latency.p99 for c, n in zip(checks, noops, strict=True)]
    print(f"p99 ratio round by round: {', '.join(f'{p:.2f}' for p in paired)}")
    print("\ninside the server, CheckQuota rounds (µs; medians over rounds of p50 / p99):")
    for part, label in (
        ("auth", "KeyRing.authenticate"),
        ("desk", "QuotaDesk.check"),
        ("script", "  its EVALSHA, awaited"),
    ):
        p50 = median(r.inside[part]["p50"] for r in checks)
        p99 = median(r.inside[part]["p99"] for r in checks)
        print(f"  {label:<24} {p50:9.1f} / {p99:9.1f}")
    print(f"  EVALSHA run in Redis (commandstats)  {median(r.evalsha_us for r in checks):.1f}")
    if run.profile:
        print("\npy-spy --gil, one more round each: µs the server held the GIL a call, by part")
        check, noop = run.profile["CheckQuota"], run.profile["no-op"]
        for part in sorted({*check, *noop}, key=lambda p: -check.get(p, 0.0)):
            print(f"  {check.get(part, 0.0):7.1f} {noop.get(part, 0.0):7.1f}  {part}")
        print(f"  {sum(check.values()):7.1f} {sum(noop.values()):7.1f}  all (CheckQuota, no-op)")


def machine(counters: redis.Redis) -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    info = counters.info("server")
    return (
        f"CPU {model}, {os.cpu_count()} cores; Python {platform.python_version()}; "
        f"Redis {info['redis_version']}; grpcio {grpc.__version__}"
    )


@contextlib.contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A fresh database on ``server_url``'s server; its URL. Dropped afterwards."""
    name = f"bench_quota_{secrets.token_hex(6)}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        info = psycopg.conninfo.conninfo_to_dict(server_url)
        info["dbname"] = name
        yield psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@contextlib.contextmanager
def redis_prefix(client: redis.Redis) -> Iterator[str]:
    """A key prefix of this run's; its keys deleted afterwards."""
    prefix = f"bench_quota_{secrets.token_hex(6)}:"
    try:
        yield prefix
    finally:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


def main(args: argparse.Namespace) -> None:
    secret = secrets.token_hex(32)
    counters = redis.Redis.from_url(args.redis)
    with (
        contextlib.closing(counters),
        bench_database(args.postgres) as url,
        redis_prefix(counters) as prefix,
        tempfile.TemporaryDirectory(prefix="bench_quota_") as data_dir,
    ):
        with open_database(url, PostgresSettings(url=url)) as database:
            store = PostgresAccountStore(database)
            plans = PostgresPlanStore(database)
            plan = plans.add_version(PlanTerms(plan_id=PLAN_ID, limits=LIMITS))
            since = datetime.now(UTC) - timedelta(days=1)
            for account in account_ids(args.accounts):
                store.create_account(account, name="quota benchmark")
                plans.assign(account, plan.plan_id, plan.version, since, "bench")
            key = Accounts(store, KeyHasher(secret.encode())).issue_key(
                KeyKind.SERVICE, name="bench gateway"
            )
        setup = Setup(url, secret, args.redis, prefix, data_dir, args.accounts)
        runs: list[Run] = []
        with server_process(setup) as server:
            print(f"server process {server.pid} on port {server.port}", file=sys.stderr)
            for concurrency in args.concurrency:
                runs.append(
                    asyncio.run(
                        run_concurrency(
                            f"127.0.0.1:{server.port}",
                            key.secret,
                            server,
                            counters,
                            args,
                            concurrency,
                        )
                    )
                )
        print(f"machine: {machine(counters)}")
        print(
            f"{args.accounts} accounts × {len(API_KEYS)} API keys, one plan; rounds of "
            f"{args.seconds:g} s, {args.rounds} of each workload, alternated, after "
            f"{args.warmup:g} s of warm-up; no-op = grpc.health.v1.Health/Check (no key check)"
        )
        for run in runs:
            print_run(run)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="a database on a server where this user may CREATE DATABASE",
    )
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of a round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each workload")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of CheckQuota first")
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--profile", type=Path, help="py-spy one more round, raw stacks here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us: stdin closes
        config: dict[str, Any] = json.loads(sys.stdin.readline())
        asyncio.run(serve(Setup(**config)))
    else:
        main(args)
