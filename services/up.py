"""Start and stop meterline's parts in one process, in the right order.

``meterline up`` runs all of them; ``meterline ingest|pipeline|api`` run one
each, against configured servers, for the distributed setup. Shutdown runs
in reverse: stop taking reports, let the pipeline price what Kafka holds,
commit, then stop the API, the account store, the warehouse and the
embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import uvicorn

from meterline.accounts import Authenticator, KeyRing, OpenDoor
from meterline.accounts.keys import KeyHasher, server_secret
from meterline.accounts.manage import Accounts, IssuedKey, first_keys
from meterline.accounts.postgres import PostgresAccountStore
from meterline.accounts.registrar import AccountRegistrar
from meterline.alerts.controller import AlertBook
from meterline.alerts.deliver import AlertDispatcher
from meterline.alerts.postgres import AlertStore
from meterline.alerts.watch import AlertWatcher
from meterline.catalog import PriceBook
from meterline.credits.postgres import PostgresLedger
from meterline.lib.kafka import BrokerError, EmbeddedBroker, ensure_topics, start_producer
from meterline.lib.metrics import CollectorRegistry, serve_metrics
from meterline.lib.postgres import Database, open_database
from meterline.lib.postgres.embedded import EmbeddedPostgres, EmbeddedPostgresError
from meterline.lib.redis_server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    RedisUnavailable,
    connect_redis,
    redis_where,
)
from meterline.lib.settings import Settings
from meterline.lib.warehouse import Warehouse, open_warehouse
from meterline.quotas.postgres import PostgresPlanStore
from meterline.quotas.rebuild import WarehouseCounts
from meterline.quotas.store import PlanStore
from services.api.app import create_app

if TYPE_CHECKING:
    from meterline.quotas.desk import QuotaDesk
    from meterline.usage.store import FlushHandler
    from pipelines.pricing.pipeline import PricingPipeline

log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: How often the API releases expired grants.
MINUTELY_S = 60.0


class _ApiServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the runner owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT (Ctrl-C), SIGTERM and SIGHUP (the terminal closed) set ``stop``.

    A second one is left to the default. SIGHUP is left alone when ignored
    (``nohup``).
    """
    loop = asyncio.get_running_loop()

    def handle(sig: signal.Signals) -> None:
        if stop.is_set():
            loop.remove_signal_handler(sig)
            signal.raise_signal(sig)
        log.info("%s received, stopping", sig.name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, handle, sig)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        loop.add_signal_handler(signal.SIGHUP, handle, signal.SIGHUP)


@dataclass
class Stack:
    """What is running, for the banner and for orderly shutdown."""

    settings: Settings
    bootstrap_servers: str = ""
    warehouse: Warehouse | None = None
    endpoints: dict[str, str] = field(default_factory=dict)
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None
    #: tasks that end only when something meterline runs on has gone (a crash)
    watches: list[asyncio.Task[None]] = field(default_factory=list)

    def broker_gone(self) -> BrokerError | None:
        """The embedded broker's exit, if it exited on its own (not stopped by us)."""
        if self.broker is None or (code := self.broker.returncode) is None:
            return None
        return BrokerError(
            f"the embedded Kafka broker exited with code {code} (its log: {self.broker.log_path})"
        )

    def postgres_gone(self) -> EmbeddedPostgresError | None:
        """The embedded PostgreSQL's exit, if it exited on its own."""
        if self.postgres is None or (code := self.postgres.returncode) is None:
            return None
        return EmbeddedPostgresError(
            f"the embedded PostgreSQL exited with code {code} "
            f"(its log: {self.settings.data_dir / 'postgres.log'})"
        )

    def redis_gone(self) -> EmbeddedRedisError | None:
        """The embedded Redis's exit, if it exited on its own."""
        if self.redis is None or (code := self.redis.returncode) is None:
            return None
        return EmbeddedRedisError(
            f"the embedded Redis exited with code {code} "
            f"(its log: {self.settings.data_dir / 'redis.log'})"
        )

    def server_gone(self) -> RuntimeError | None:
        return self.broker_gone() or self.postgres_gone() or self.redis_gone()


async def _watch_servers(stack: Stack) -> None:
    """Raises when an embedded server (broker, PostgreSQL, Redis) exits on its own."""
    while (gone := stack.server_gone()) is None:
        await asyncio.sleep(0.2)
    raise gone


@contextlib.asynccontextmanager
async def kafka(settings: Settings, stack: Stack) -> AsyncIterator[str]:
    """The configured Kafka, or an embedded Tansu broker; topics exist afterwards."""
    broker = None
    if settings.embedded_kafka:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(
            settings.kafka.embedded_port, log_path=settings.data_dir / "tansu.log"
        )
        broker.start()  # on this thread, the main one: see EmbeddedBroker.start
        stack.broker = broker
        stack.endpoints["kafka"] = f"{broker.bootstrap_servers} (embedded Tansu, memory storage)"
        stack.watches.append(asyncio.create_task(_watch_servers(stack)))
    else:
        stack.endpoints["kafka"] = settings.kafka.bootstrap_servers
    stack.bootstrap_servers = settings.bootstrap_servers
    try:
        await ensure_topics(stack.bootstrap_servers, settings.kafka)
        yield stack.bootstrap_servers
    finally:
        for watch in stack.watches:
            if not watch.cancel() and not watch.cancelled():
                watch.exception()  # done: its failure was reported where it was awaited
        if broker is not None:
            await asyncio.to_thread(broker.stop)


@contextlib.contextmanager
def warehouse(settings: Settings, stack: Stack) -> Iterator[Warehouse]:
    """The migrated warehouse, with the seed catalog loaded when it has no prices."""
    wh = open_warehouse(settings)
    added = PriceBook(wh).seed_if_empty()
    if added:
        log.info("loaded the seed catalog: %d price versions", added)
    stack.warehouse = wh
    stack.endpoints["clickhouse"] = (
        settings.clickhouse.url or f"{settings.data_dir / 'chdb'} (embedded chDB)"
    )
    try:
        yield wh
    finally:
        wh.close()


@contextlib.contextmanager
def postgres(settings: Settings, stack: Stack) -> Iterator[Database]:
    """The configured PostgreSQL, or an embedded one under data_dir; migrated."""
    server, watch = None, None
    if settings.embedded_postgres:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedPostgres(
            settings.data_dir / "postgres",
            settings.postgres.embedded_port,
            log_path=settings.data_dir / "postgres.log",
        )
        server.start()  # on the main thread, as the broker
        stack.postgres = server
        stack.endpoints["postgresql"] = f"{server.url} (embedded PostgreSQL)"
        if not stack.watches:  # else the broker's watch looks after both
            watch = asyncio.get_running_loop().create_task(_watch_servers(stack))
            stack.watches.append(watch)
    try:
        database = open_database(settings.postgres_url, settings.postgres)
        stack.endpoints.setdefault("postgresql", database.where)
        try:
            yield database
        finally:
            database.close()
    finally:
        stack.postgres = None  # stopped by us from here on, not gone
        if watch is not None:
            watch.cancel()
            stack.watches.remove(watch)
        if server is not None:
            server.stop()


@contextlib.contextmanager
def redis_server(settings: Settings, stack: Stack) -> Iterator[str]:
    """The configured Redis, or an embedded one (memory only); yields its URL."""
    server, watch = None, None
    if settings.embedded_redis:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        server = EmbeddedRedis(
            settings.redis.embedded_port,
            data_dir=settings.data_dir / "redis",
            log_path=settings.data_dir / "redis.log",
        )
        server.start()
        stack.redis = server
        stack.endpoints["redis"] = f"{server.url} (embedded Redis {server.version}, memory only)"
        if not stack.watches:
            watch = asyncio.get_running_loop().create_task(_watch_servers(stack))
            stack.watches.append(watch)
    else:
        stack.endpoints["redis"] = redis_where(settings.redis_url)
    try:
        yield settings.redis_url
    finally:
        stack.redis = None
        if watch is not None:
            watch.cancel()
            stack.watches.remove(watch)
        if server is not None:
            server.stop()


@dataclass
class Access:
    """Who may ask: the authenticator every server checks keys with, the accounts, the
    plans they are on, their credits and alerts, and the server secret."""

    auth: Authenticator
    accounts: Accounts
    ring: KeyRing
    plans: PlanStore
    ledger: PostgresLedger
    alerts: AlertStore
    server_secret: bytes


@contextlib.asynccontextmanager
async def access(settings: Settings, database: Database) -> AsyncIterator[Access]:
    """The key ring, loaded and kept fresh while the block runs."""
    store = PostgresAccountStore(database)
    secret = server_secret(settings.keys.secret.get_secret_value(), settings.data_dir)
    ring = KeyRing(
        store,
        KeyHasher(secret),
        refresh_s=settings.keys.refresh_s,
        last_used_flush_s=settings.keys.last_used_flush_s,
    )
    await asyncio.to_thread(ring.load)
    auth: Authenticator = ring
    if settings.auth == "off":
        log.warning(
            "METERLINE_AUTH=off: every route and RPC answers anyone as an admin. "
            "For local development only."
        )
        auth = OpenDoor()
    stop = asyncio.Event()
    refreshing = asyncio.create_task(ring.run(stop))
    try:
        yield Access(
            auth,
            Accounts(store, ring.hasher, ring),
            ring,
            PostgresPlanStore(database),
            PostgresLedger(database),
            AlertStore(database),
            secret,
        )
    finally:
        stop.set()
        await refreshing


def print_first_keys(issued: list[IssuedKey], path: Path) -> None:
    """The keys made on an empty store, shown this once."""
    if not issued:
        return
    lines = [f"  {k.key.kind:<8} {k.secret}" for k in issued]
    print(
        "API keys made for this new store (shown once; also in "
        f"{path}, readable only by you):\n" + "\n".join(lines),
        flush=True,
    )


class ApiServer:
    """The Litestar app under uvicorn, started and stopped from the runner's loop."""

    def __init__(
        self,
        settings: Settings,
        wh: Warehouse,
        registry: CollectorRegistry,
        access: Access,
        quotas: QuotaDesk | None = None,
        *,
        bootstrap_servers: str | None = None,
    ) -> None:
        self.address = f"http://{settings.http.host}:{settings.http.port}"
        self.server = _ApiServer(
            uvicorn.Config(
                create_app(
                    wh,
                    auth=access.auth,
                    accounts=access.accounts,
                    plans=access.plans,
                    quotas=quotas,
                    ledger=access.ledger,
                    alerts=AlertBook(access.alerts, access.server_secret),
                    registry=registry,
                    settings=settings.http,
                ),
                host=settings.http.host,
                port=settings.http.port,
                log_level="warning",
                lifespan="on",
            )
        )
        self.task: asyncio.Task[None] | None = None
        self.ledger = access.ledger
        self.watcher = alert_watcher(access, wh)
        self.dispatcher = AlertDispatcher(
            access.alerts,
            server_secret=access.server_secret,
            settings=settings.alerts,
            kafka=settings.kafka,
            bootstrap_servers=bootstrap_servers or settings.bootstrap_servers,
        )
        self.minutely: asyncio.Task[None] | None = None

    async def _each_minute(self) -> None:
        """Grants that expired are released, and every account's alert rules evaluated,
        each minute, even on accounts with no other activity (a posting releases the
        account's expired grants first anyway; a batch evaluates its accounts' rules)."""
        while True:
            try:
                released = await asyncio.to_thread(self.ledger.expire_due)
                if released:
                    log.info("credits: %d expired grants released", released)
            except Exception as exc:  # PostgreSQL down: the next minute tries again
                log.warning("credits: could not release expired grants: %s", exc)
            try:
                await asyncio.to_thread(self.watcher.sweep)
            except Exception as exc:
                log.warning("alerts: could not evaluate the rules: %s", exc)
            await asyncio.sleep(MINUTELY_S)

    async def _serve(self) -> None:
        try:
            await self.server.serve()
        except SystemExit:  # uvicorn exits the process when it cannot bind; we only fail
            raise OSError(f"the HTTP API could not listen on {self.address}") from None

    async def start(self) -> None:
        self.task = asyncio.create_task(self._serve())
        while not self.server.started:
            if self.task.done():
                await self.task  # raises the reason it could not start
                raise OSError(f"the HTTP API could not listen on {self.address}")
            await asyncio.sleep(0.02)
        self.minutely = asyncio.create_task(self._each_minute())
        await self.dispatcher.start()

    async def stop(self) -> None:
        await self.dispatcher.close()
        if self.minutely is not None:
            self.minutely.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.minutely
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(OSError):  # already raised by start()
                await self.task


def print_banner(stack: Stack) -> None:
    width = max(len(k) for k in stack.endpoints)
    lines = [f"  {name:<{width}}  {where}" for name, where in stack.endpoints.items()]
    print("meterline is up:\n" + "\n".join(lines) + "\nPress Ctrl-C to stop.", flush=True)


async def _first_of(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> BaseException | None:
    """Wait for a stop signal, or for a part to end on its own; returns its failure."""
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({stopping, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    for task in done - {stopping}:
        if task.exception() is not None:
            log.error("a part of meterline stopped: %s", task.exception())
            return task.exception()
    return None


def _stopped_by(failure: BaseException | None) -> None:
    """After an orderly stop: exit with the failure that caused it, if any."""
    if failure is not None:
        raise RuntimeError(f"stopped because {failure}") from failure


@contextlib.asynccontextmanager
async def ingest_server(
    settings: Settings,
    bootstrap: str,
    stack: Stack,
    access: Access,
    *,
    registry: CollectorRegistry,
) -> AsyncIterator[None]:
    """The ingest gRPC server and its producer; on exit, in-flight reports finish first."""
    from meterline.accounts.directory import AccountDirectory
    from services.ingest.server import IngestServer

    producer = await start_producer(bootstrap, settings.kafka)
    try:
        directory = None
        if settings.accounts.unknown == "reject":
            directory = AccountDirectory(access.accounts.store)
        server = IngestServer(
            producer,
            topic=settings.kafka.topic,
            rules=settings.events,
            settings=settings.grpc,
            registry=registry,
            auth=access.auth,
            directory=directory,
        )
        await server.start()
        stack.endpoints["ingest (gRPC)"] = server.address
        try:
            yield
        finally:
            await server.stop()
    finally:
        await producer.stop()


@contextlib.contextmanager
def pricing_pipeline(
    settings: Settings,
    wh: Warehouse,
    bootstrap: str,
    access: Access,
    *,
    registry: CollectorRegistry,
) -> Iterator[PricingPipeline]:
    """The pipeline with its flush handlers (accounts first seen are registered; prepaid
    accounts' credits are debited; quota reservations are settled with what was used)
    and the accounts' plans, which set what each event charges."""
    from meterline.credits.poster import LedgerPoster
    from meterline.quotas.charges import ChargeBook
    from meterline.quotas.settler import QuotaSettler
    from pipelines.pricing.pipeline import PricingPipeline

    plans = ChargeBook(access.plans)
    settler = QuotaSettler(
        settings.redis_url,
        key_prefix=settings.redis.key_prefix,
        settings=settings.quota,
        plans=plans,
        accounts=access.accounts.store,
    )
    watcher = alert_watcher(access, wh)
    try:
        handlers: list[FlushHandler] = [
            AccountRegistrar(access.accounts.store),
            LedgerPoster(access.ledger, plans, credits_to=settler.take_credits),
            settler,
            watcher,
        ]
        yield PricingPipeline(
            settings, wh, bootstrap, handlers=handlers, plans=plans, registry=registry
        )
    finally:
        watcher.close()
        settler.close()


def alert_watcher(access: Access, wh: Warehouse) -> AlertWatcher:
    """What evaluates the accounts' alert rules: after each batch, and each minute."""
    return AlertWatcher(
        access.alerts,
        ledger=access.ledger,
        plans=access.plans,
        accounts=access.accounts.store,
        counts=WarehouseCounts(wh),
    )


@contextlib.asynccontextmanager
async def quota_server(
    settings: Settings,
    wh: Warehouse,
    stack: Stack,
    access: Access,
    *,
    registry: CollectorRegistry,
) -> AsyncIterator[QuotaDesk]:
    """The quota gRPC server and the desk behind it (the HTTP API reads quotas there)."""
    import redis.asyncio

    from meterline.quotas.desk import QuotaDesk
    from services.quota.server import QuotaServer

    try:
        client = await connect_redis(settings.redis_url)
    except RedisUnavailable as exc:  # checks answer as when_redis_down says until it is
        verdict = "allowed" if settings.quota.when_redis_down == "allow" else "denied"
        log.warning("%s; quota checks are %s until it answers", exc, verdict)
        client = redis.asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )
    desk = QuotaDesk(
        client,
        key_prefix=settings.redis.key_prefix,
        settings=settings.quota,
        accounts=access.accounts.store,
        plans=access.plans,
        ledger=access.ledger,
        warehouse=wh,
    )
    try:
        await desk.start()
        server = QuotaServer(
            desk,
            settings=settings.quota,
            auth=access.auth,
            registry=registry,
            rules=settings.events,
        )
        await server.start()
        stack.endpoints["quotas (gRPC)"] = server.address
        try:
            yield desk
        finally:
            await server.stop()
    finally:
        await desk.close()
        await client.aclose()


async def up(settings: Settings, stop: asyncio.Event) -> None:
    """Everything on one machine: broker, warehouse, PostgreSQL, Redis, ingest, pipeline,
    quotas, API."""
    stack = Stack(settings)
    registry = CollectorRegistry()  # every part's metrics, served by the HTTP API
    async with (
        kafka(settings, stack) as bootstrap,
        _sync(warehouse(settings, stack)) as wh,
        _sync(postgres(settings, stack)) as database,
        _sync(redis_server(settings, stack)),
        access(settings, database) as granted,
        _sync(pricing_pipeline(settings, wh, bootstrap, granted, registry=registry)) as pipeline,
        quota_server(settings, wh, stack, granted, registry=registry) as quotas,
    ):
        keys_file = settings.data_dir / "keys.json"
        issued = await asyncio.to_thread(first_keys, granted.accounts, keys_file)
        pipeline_stop = asyncio.Event()
        # A memory-only broker loses what is left in it: price it all before stopping.
        drain_s = 60.0 if settings.embedded_kafka else 0.0
        pipeline_task = asyncio.create_task(pipeline.run(pipeline_stop, drain_s=drain_s))
        stack.endpoints["pricing pipeline"] = (
            f"group {settings.kafka.consumer_group} on topic {settings.kafka.topic}"
        )
        api = ApiServer(settings, wh, registry, granted, quotas, bootstrap_servers=bootstrap)
        failure = None
        try:
            await api.start()
            stack.endpoints["HTTP API"] = api.address
            async with ingest_server(settings, bootstrap, stack, granted, registry=registry):
                print_first_keys(issued, keys_file)
                print_banner(stack)
                failure = await _first_of(stop, pipeline_task, *stack.watches)
            # Ingest has stopped taking reports: drain what Kafka holds, then stop.
        finally:
            pipeline_stop.set()
            await asyncio.wait({pipeline_task, *stack.watches}, return_when=asyncio.FIRST_COMPLETED)
            if not pipeline_task.done():
                pipeline_task.cancel()  # the broker has gone: nothing is left to drain
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await pipeline_task
            await api.stop()
        # a part that failed because an embedded server went: say why it went
        failure = stack.server_gone() or failure
    print(f"meterline stopped: {pipeline.metrics.as_dict()}", flush=True)
    _stopped_by(failure)


@contextlib.asynccontextmanager
async def _sync(manager: contextlib.AbstractContextManager[_T]) -> AsyncIterator[_T]:
    """A blocking context manager among asynchronous ones, entered on this thread."""
    with manager as value:
        yield value


@contextlib.contextmanager
def own_metrics(settings: Settings, stack: Stack) -> Iterator[CollectorRegistry]:
    """A standalone process's registry, served at its own /metrics while it runs."""
    registry = CollectorRegistry()
    metrics = serve_metrics(registry, settings.metrics.host, settings.metrics.port)
    stack.endpoints["metrics"] = f"http://{settings.metrics.host}:{metrics.port}/metrics"
    try:
        yield registry
    finally:
        metrics.close()


async def ingest_only(settings: Settings, stop: asyncio.Event) -> None:
    """The ingest gRPC server alone (scale it out behind a load balancer), with its /metrics."""
    stack = Stack(settings)
    with own_metrics(settings, stack) as registry:
        async with (
            kafka(settings, stack) as bootstrap,
            _sync(postgres(settings, stack)) as database,
            access(settings, database) as granted,
            ingest_server(settings, bootstrap, stack, granted, registry=registry),
        ):
            print_banner(stack)
            failure = await _first_of(stop, *stack.watches)
    _stopped_by(failure)


async def pipeline_only(settings: Settings, stop: asyncio.Event) -> None:
    """One pricing pipeline instance; run several, they share the consumer group."""
    stack = Stack(settings)
    with own_metrics(settings, stack) as registry:
        async with (
            kafka(settings, stack) as bootstrap,
            _sync(warehouse(settings, stack)) as wh,
            _sync(postgres(settings, stack)) as database,
            _sync(redis_server(settings, stack)),
            access(settings, database) as granted,
            _sync(
                pricing_pipeline(settings, wh, bootstrap, granted, registry=registry)
            ) as pipeline,
        ):
            stack.endpoints["pricing pipeline"] = f"group {settings.kafka.consumer_group}"
            print_banner(stack)
            await pipeline.run(stop)


async def api_only(settings: Settings, stop: asyncio.Event) -> None:
    """The HTTP API and the quota gRPC server, over the configured warehouse, PostgreSQL
    and Redis: run as many as wanted, they share Redis."""
    stack = Stack(settings)
    registry = CollectorRegistry()
    async with (
        _sync(warehouse(settings, stack)) as wh,
        _sync(postgres(settings, stack)) as database,
        _sync(redis_server(settings, stack)),
        access(settings, database) as granted,
        quota_server(settings, wh, stack, granted, registry=registry) as quotas,
    ):
        api = ApiServer(settings, wh, registry, granted, quotas)
        await api.start()
        stack.endpoints["HTTP API"] = api.address
        print_banner(stack)
        try:
            await stop.wait()
        finally:
            await api.stop()
