"""Turn a wire ``UsageEvent`` into a checked domain event, or say why not.

Ingest uses this to reject an event with its reason; the pricing pipeline
uses it again, against the Kafka record's timestamp, to dead-letter what
slipped past (another producer, an older ingest). Both give the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf.message import DecodeError

from meterline.config import EventRules
from meterline.pricing import TOKEN_FIELDS, TokenUsage
from meterline.v1 import usage_pb2

_STATUS_NAMES = {
    usage_pb2.REQUEST_STATUS_UNSPECIFIED: "unspecified",
    usage_pb2.REQUEST_STATUS_OK: "ok",
    usage_pb2.REQUEST_STATUS_ERROR: "error",
    usage_pb2.REQUEST_STATUS_CANCELLED: "cancelled",
}
_MAX_LATENCY_MS = 24 * 3600 * 1000


class InvalidEvent(ValueError):
    """An event that cannot be billed; ``str(exc)`` is the reason given back."""


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A validated usage event, in domain types."""

    event_id: str
    account_id: str
    api_key_id: str
    model: str
    provider: str
    occurred_at: datetime
    usage: TokenUsage
    latency_ms: int
    ttft_ms: int
    status: str
    provider_usage_json: str


def decode(value: bytes | None) -> usage_pb2.UsageEvent:
    """Parse a Kafka record value; raises :class:`InvalidEvent` if it is not a UsageEvent."""
    if not value:
        raise InvalidEvent("empty record: expected a protobuf meterline.v1.UsageEvent")
    event = usage_pb2.UsageEvent()
    try:
        event.ParseFromString(value)
    except DecodeError as exc:
        raise InvalidEvent(f"not a protobuf meterline.v1.UsageEvent: {exc}") from exc
    if not event.event_id and event.UnknownFields():  # type: ignore[attr-defined]
        raise InvalidEvent("not a protobuf meterline.v1.UsageEvent: only unknown fields")
    return event


def validate(event: usage_pb2.UsageEvent, *, now: datetime, rules: EventRules) -> UsageRecord:
    """Check one event against the rules; ``now`` is when it was received."""
    problems: list[str] = []

    def text(name: str, limit: int, *, required: bool = True) -> str:
        value: str = getattr(event, name)
        if not value.strip():
            if required:
                problems.append(f"{name} is missing")
        elif len(value) > limit:
            problems.append(f"{name} is longer than {limit} characters ({len(value)})")
        elif not value.isprintable():
            problems.append(f"{name} contains control characters")
        return value

    event_id = text("event_id", rules.max_id_length)
    account_id = text("account_id", rules.max_id_length)
    api_key_id = text("api_key_id", rules.max_id_length, required=False)
    model = text("model", rules.max_name_length)
    provider = text("provider", rules.max_name_length)

    counts = {name: getattr(event, name) for name in TOKEN_FIELDS}
    for name, count in counts.items():
        if count < 0:
            problems.append(f"{name} is negative ({count})")
        elif count > rules.max_tokens:
            problems.append(f"{name} is {count}, above the limit of {rules.max_tokens}")
    if all(count >= 0 for count in counts.values()):  # else the subsets say nothing more
        cache = (
            counts["cached_input_tokens"]
            + counts["cache_write_5m_tokens"]
            + counts["cache_write_1h_tokens"]
        )
        if cache > counts["input_tokens"]:
            problems.append(
                f"cached and cache-write tokens ({cache}) exceed input_tokens "
                f"({counts['input_tokens']}); input_tokens must include them"
            )
        if counts["reasoning_tokens"] > counts["output_tokens"]:
            problems.append(
                f"reasoning_tokens ({counts['reasoning_tokens']}) exceed output_tokens "
                f"({counts['output_tokens']}); output_tokens must include them"
            )

    for name in ("latency_ms", "ttft_ms"):
        value = getattr(event, name)
        if not 0 <= value <= _MAX_LATENCY_MS:
            problems.append(f"{name} is {value}, outside 0..{_MAX_LATENCY_MS}")
    if 0 < event.latency_ms < event.ttft_ms:
        problems.append(f"ttft_ms ({event.ttft_ms}) exceeds latency_ms ({event.latency_ms})")

    status = _STATUS_NAMES.get(event.status)
    if status is None:
        problems.append(f"status {event.status} is not a known RequestStatus")

    if len(event.provider_usage_json.encode()) > rules.max_provider_usage_bytes:
        problems.append(
            f"provider_usage_json is larger than {rules.max_provider_usage_bytes} bytes"
        )

    occurred_at = now
    if not event.HasField("occurred_at"):
        problems.append("occurred_at is missing")
    else:
        occurred_at = event.occurred_at.ToDatetime(tzinfo=UTC)
        if occurred_at < now - rules.max_past:
            problems.append(
                f"occurred_at {occurred_at.isoformat()} is more than "
                f"{rules.max_past.days} days in the past"
            )
        elif occurred_at > now + rules.max_future:
            problems.append(
                f"occurred_at {occurred_at.isoformat()} is more than "
                f"{int(rules.max_future.total_seconds())} s in the future"
            )

    if problems:
        raise InvalidEvent("; ".join(problems))
    return UsageRecord(
        event_id=event_id,
        account_id=account_id,
        api_key_id=api_key_id,
        model=model,
        provider=provider,
        occurred_at=occurred_at,
        usage=TokenUsage(**counts),
        latency_ms=event.latency_ms,
        ttft_ms=event.ttft_ms,
        status=status or "unspecified",
        provider_usage_json=event.provider_usage_json,
    )
