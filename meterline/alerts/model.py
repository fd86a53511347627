"""Alerts: what an account wants to hear of (rules), when a rule fires, and how an
alert is signed and retried. Pure: the store (:mod:`.postgres`) keeps them, the watcher
(:mod:`.watch`) evaluates rules, the dispatcher (:mod:`.deliver`) sends alerts.

**Once per crossing.** Every alert has a key of its own (``dedupe_key``) and the store
keeps one alert per key, so however many evaluators see a crossing, it is one alert:

* ``balance_below``: the rule fires when what the account may spend is below the
  threshold while the rule is armed, and is armed again once it is back at or above it;
  the key counts the crossings;
* ``credits_expiring``: once per grant that will expire within ``within_s`` with
  something left;
* ``spend_share`` / ``tokens_share``: once per calendar window (the account's day or
  month) when its usage reaches ``share_percent`` of the plan's cap of that window.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

__all__ = [
    "ALERT_ID_HEADER",
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Alert",
    "AlertKind",
    "Attempt",
    "Channel",
    "Delivery",
    "Rule",
    "retry_delay",
    "signature",
    "webhook_secret",
]

#: Headers of a webhook's request: the signature ("v1=" and the HMAC-SHA256 hex of
#: "<timestamp>.<body>" under the account's signing secret), and the timestamp (unix
#: seconds) it covers, so that a receiver can refuse a replayed old request.
SIGNATURE_HEADER = "Meterline-Signature"
TIMESTAMP_HEADER = "Meterline-Timestamp"
ALERT_ID_HEADER = "Meterline-Alert-Id"


class AlertKind(StrEnum):
    BALANCE_BELOW = "balance_below"
    CREDITS_EXPIRING = "credits_expiring"
    SPEND_SHARE = "spend_share"
    TOKENS_SHARE = "tokens_share"


class Channel(StrEnum):
    WEBHOOK = "webhook"
    KAFKA = "kafka"


@dataclass(frozen=True, slots=True)
class Rule:
    """One threshold of one account. Which fields are set depends on ``kind``."""

    rule_id: str
    account_id: str
    kind: AlertKind
    #: balance_below: pico-dollars
    threshold_picos: int | None
    #: credits_expiring: how long before a grant's expiry
    within: timedelta | None
    #: spend_share, tokens_share: of the plan's cap, in percent
    share_percent: int | None
    #: spend_share, tokens_share: "day" or "month"
    calendar: str | None
    armed: bool
    crossings: int
    created_at: datetime
    created_by: str


@dataclass(frozen=True, slots=True)
class Attempt:
    attempt: int
    at: datetime
    #: the receiver's HTTP status; None when none came
    status: int | None
    error: str


@dataclass(frozen=True, slots=True)
class Delivery:
    channel: Channel
    #: pending, delivered or failed (attempts exhausted)
    state: str
    attempts: list[Attempt]
    next_attempt_at: datetime | None
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class Alert:
    alert_id: str
    account_id: str
    rule_id: str
    kind: AlertKind
    fired_at: datetime
    #: what is sent: the alert as JSON
    payload: dict[str, Any]
    deliveries: list[Delivery]


def webhook_secret(server_secret: bytes, account_id: str, generation: int) -> str:
    """The account's signing secret: derived, never stored; a new webhook URL (a new
    generation) has a new one."""
    text = f"meterline-alerts-webhook\0{account_id}\0{generation}".encode()
    return "whsec_" + hmac.new(server_secret, text, hashlib.sha256).hexdigest()


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The value of :data:`SIGNATURE_HEADER` of a request of ``body`` sent at
    ``timestamp``: what a receiver recomputes with its secret and compares."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed: doubling, capped."""
    return float(min(base_s * 2 ** max(attempts - 1, 0), max_s))
