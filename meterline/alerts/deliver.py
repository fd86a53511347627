"""Sends fired alerts: to the account's webhook, signed, and to the Kafka topic
``meterline.alerts`` (``KafkaSettings.alerts_topic``), keyed by account.

Runs in every API process. Each loop claims the deliveries due (the store's outbox,
``SKIP LOCKED`` with a lease, so replicas share them and each is sent by one), sends
them, and records each attempt. A webhook answering 2xx has it; anything else (a
status, a refused connection, a timeout) is tried again after ``retry_base_s``,
doubling up to ``retry_max_s``, until ``max_attempts`` mark it failed. Kafka is tried
the same way while the broker does not take it.

A webhook request is ``POST`` of the alert's JSON with :data:`TIMESTAMP_HEADER` (unix
seconds), :data:`SIGNATURE_HEADER` (``v1=`` HMAC-SHA256 hex of ``"<timestamp>.<body>"``
under the account's signing secret) and ``Meterline-Alert-Id``. A receiver recomputes
the signature, refuses a timestamp more than a few minutes old, and treats an alert
id it has seen as done: a delivery whose 2xx was lost on the way is sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
from aiokafka import AIOKafkaProducer

from meterline.alerts.model import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Channel,
    retry_delay,
    signature,
    webhook_secret,
)
from meterline.alerts.postgres import AlertStore, Claim
from meterline.lib.kafka import start_producer
from meterline.lib.settings import AlertSettings, KafkaSettings

__all__ = ["AlertDispatcher"]

log = logging.getLogger(__name__)

#: Deliveries one loop claims, at most.
CLAIM_LIMIT = 50


def body_of(claim: Claim) -> bytes:
    """The alert as sent: compact JSON, keys sorted, so its signature is reproducible."""
    return json.dumps(claim.payload, sort_keys=True, separators=(",", ":")).encode()


class AlertDispatcher:
    """The API's sender of alerts (see the module's docstring).

    Args:
        store: the outbox.
        server_secret: what the accounts' signing secrets are derived from.
        bootstrap_servers: the Kafka the topic is on.
    """

    def __init__(
        self,
        store: AlertStore,
        *,
        server_secret: bytes,
        settings: AlertSettings,
        kafka: KafkaSettings,
        bootstrap_servers: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.kafka = kafka
        self.bootstrap_servers = bootstrap_servers
        self._secret = server_secret
        self._clock = clock
        self._http = httpx.AsyncClient(timeout=settings.timeout_s, follow_redirects=False)
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()  # one producer, however many sends wait for it
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._http.aclose()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()

    async def _run(self) -> None:
        while True:
            try:
                sent = await self.deliver_due()
            except Exception as exc:  # PostgreSQL down: the next loop tries again
                log.warning("alerts: could not claim deliveries: %s", exc)
                sent = 0
            if sent < CLAIM_LIMIT:
                await asyncio.sleep(self.settings.poll_s)

    async def deliver_due(self) -> int:
        """Send what is due now, at once; returns how many were tried."""
        lease = timedelta(seconds=self.settings.lease_s)
        claims = await asyncio.to_thread(lambda: self.store.claim(limit=CLAIM_LIMIT, lease=lease))
        await asyncio.gather(*(self._deliver(c) for c in claims))
        return len(claims)

    async def _deliver(self, claim: Claim) -> None:
        if claim.channel is Channel.WEBHOOK:
            status, error = await self._post(claim)
            delivered = status is not None and 200 <= status < 300
        else:
            status, error = None, await self._publish(claim)
            delivered = not error
        attempts = claim.attempts + 1
        retry_at = None
        if not delivered and attempts < self.settings.max_attempts:
            wait = retry_delay(attempts, self.settings.retry_base_s, self.settings.retry_max_s)
            retry_at = datetime.now(UTC) + timedelta(seconds=wait)
        if not delivered:
            log.warning(
                "alerts: %s of %s, attempt %d: %s%s",
                claim.channel,
                claim.alert_id,
                attempts,
                error or f"HTTP {status}",
                "" if retry_at else "; no more attempts",
            )
        await asyncio.to_thread(
            lambda: self.store.record(
                claim,
                delivered=delivered,
                status=status,
                error=error,
                retry_at=retry_at,
            )
        )

    async def _post(self, claim: Claim) -> tuple[int | None, str]:
        """(the receiver's status, or None and why none came)."""
        if claim.url is None or claim.generation is None:
            return None, "the account has no webhook"
        body = body_of(claim)
        timestamp = int(self._clock())
        secret = webhook_secret(self._secret, claim.account_id, claim.generation)
        headers = {
            "content-type": "application/json",
            "user-agent": "meterline-alerts",
            ALERT_ID_HEADER: claim.alert_id,
            TIMESTAMP_HEADER: str(timestamp),
            SIGNATURE_HEADER: signature(secret, timestamp, body),
        }
        try:
            response = await self._http.post(claim.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc}"
        return response.status_code, "" if response.is_success else response.text[:200]

    async def _publish(self, claim: Claim) -> str:
        """'' when the broker has it; else why not."""
        try:
            async with self._starting:
                if self._producer is None:
                    self._producer = await start_producer(self.bootstrap_servers, self.kafka)
            await self._producer.send_and_wait(
                self.kafka.alerts_topic, value=body_of(claim), key=claim.account_id.encode()
            )
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""
