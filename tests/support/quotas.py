"""A quota gRPC server of a test's own: a QuotaServer and its QuotaDesk over this
machine's Redis (under a key prefix, deleted after), the run's PostgreSQL and the
session's chDB; and the requests and plans the quota tests make."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import redis.asyncio

from conftest import unique
from meterline.accounts import KeyRing
from meterline.accounts.grpc import key_channel
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.lib.postgres import Database
from meterline.lib.settings import QuotaSettings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.plans import PlanTerms, PlanVersion
from meterline.quotas.postgres import PostgresPlanStore
from meterline.v1 import quota_pb2, quota_pb2_grpc
from services.quota.server import QuotaServer

LOCAL_REDIS = "redis://127.0.0.1:6379/0"


@dataclass
class Quotas:
    """A running quota server, and what a test needs around it."""

    address: str
    desk: QuotaDesk
    prefix: str
    accounts: Accounts
    plans: PostgresPlanStore
    service_key: IssuedKey
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def stub(self, key: str | None = None) -> quota_pb2_grpc.QuotaServiceAsyncStub:
        """A client presenting ``key`` (default: the session's service key)."""
        channel = key_channel(self.address, key if key is not None else self.service_key.secret)
        self.channels.append(channel)
        return quota_pb2_grpc.QuotaServiceStub(channel)

    def account_on(self, *, timezone: str = "UTC", **terms: Any) -> tuple[str, PlanVersion]:
        """A new account on a new plan, in force since a day ago."""
        account = unique("quota")
        self.accounts.store.create_account(account, timezone=timezone)
        plan = self.plans.add_version(PlanTerms(plan_id=unique("plan"), **terms))
        since = datetime.now(UTC) - timedelta(days=1)
        self.plans.assign(account, plan.plan_id, plan.version, since, "test")
        return account, plan


def ask(account: str, **fields: Any) -> quota_pb2.CheckQuotaRequest:
    """A check of gpt-4.1-mini, 1,000 tokens in and at most 500 out, a new event id."""
    fields.setdefault("model", "openai/gpt-4.1-mini")
    fields.setdefault("provider", "openai")
    fields.setdefault("input_tokens", 1_000)
    fields.setdefault("max_output_tokens", 500)
    fields.setdefault("event_id", str(uuid.uuid4()))
    return quota_pb2.CheckQuotaRequest(account_id=account, **fields)


@contextlib.asynccontextmanager
async def quota_server(
    prefix: str,
    *,
    warehouse: Warehouse,
    database: Database,
    accounts: Accounts,
    key_ring: KeyRing,
    service_key: IssuedKey,
    settings: QuotaSettings | None = None,
) -> AsyncIterator[Quotas]:
    client = redis.asyncio.Redis.from_url(LOCAL_REDIS)
    plans = PostgresPlanStore(database)
    desk = QuotaDesk(
        client,
        key_prefix=prefix,
        settings=settings or QuotaSettings(),
        accounts=accounts.store,
        plans=plans,
        warehouse=warehouse,
        refresh_s=0.2,
    )
    await desk.start()
    server = QuotaServer(desk, settings=QuotaSettings(port=0), auth=key_ring)
    await server.start()
    running = Quotas(server.address, desk, prefix, accounts, plans, service_key)
    try:
        yield running
    finally:
        for channel in running.channels:
            await channel.close(grace=None)
        await server.stop()
        await desk.close()
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
