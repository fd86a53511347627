"""Turn a wire ``UsageEvent`` into a checked domain event, or say why not.

Ingest uses this to reject an event with its reason; the pricing pipeline
uses it again, against the Kafka record's timestamp, to dead-letter what
slipped past (another producer, an older ingest). Both give the same reasons.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from meterline.lib.settings import EventRules
from meterline.tokens import TOKEN_FIELDS, TokenUsage
from meterline.v1 import usage_pb2

_STATUS_NAMES = {
    usage_pb2.REQUEST_STATUS_UNSPECIFIED: "unspecified",
    usage_pb2.REQUEST_STATUS_OK: "ok",
    usage_pb2.REQUEST_STATUS_ERROR: "error",
    usage_pb2.REQUEST_STATUS_CANCELLED: "cancelled",
}
_MAX_LATENCY_MS = 24 * 3600 * 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799  # 0001-01-01 .. 9999-12-31


class InvalidEvent(ValueError):
    """An event that cannot be billed; ``str(exc)`` is the reason given back."""


class UsageRecord(NamedTuple):
    """A validated usage event, in domain types (a named tuple: quick to make)."""

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
    try:
        event = usage_pb2.UsageEvent.FromString(value)
    except DecodeError as exc:
        raise InvalidEvent(f"not a protobuf meterline.v1.UsageEvent: {exc}") from exc
    if not event.event_id and len(unknown_fields.UnknownFieldSet(event)):
        raise InvalidEvent("not a protobuf meterline.v1.UsageEvent: only unknown fields")
    return event


def validate(event: usage_pb2.UsageEvent, *, now: datetime, rules: EventRules) -> UsageRecord:
    """Check one event against the rules; ``now`` is when it was received.

    Nearly every event is well formed, so all rules are first checked at once
    in one expression: this is the hot path of ingest and of the pipeline. An
    event that fails it goes through :func:`_problems`, which names each rule
    it breaks (and may find none: the quick check is stricter about a blank
    api_key_id).
    """
    # Each field is read once (a protobuf attribute is not a cheap read); the
    # names are the fields', so the positional constructors below read plainly.
    event_id, account_id, api_key_id = event.event_id, event.account_id, event.api_key_id
    model, provider = event.model, event.provider
    input_tokens, output_tokens = event.input_tokens, event.output_tokens
    cached_input_tokens = event.cached_input_tokens
    cache_write_5m_tokens = event.cache_write_5m_tokens
    cache_write_1h_tokens = event.cache_write_1h_tokens
    reasoning_tokens = event.reasoning_tokens
    latency_ms, ttft_ms = event.latency_ms, event.ttft_ms
    status = _STATUS_NAMES.get(event.status)
    provider_usage_json = event.provider_usage_json
    cached_or_written = cached_input_tokens + cache_write_5m_tokens + cache_write_1h_tokens
    occurred_at = _occurred_at(event)
    id_max, name_max, token_max = rules.max_id_length, rules.max_name_length, rules.max_tokens
    well_formed = (
        # texts: present (api_key_id may be empty), not too long, printable
        0 < len(event_id) <= id_max
        and 0 < len(account_id) <= id_max
        and len(api_key_id) <= id_max
        and 0 < len(model) <= name_max
        and 0 < len(provider) <= name_max
        and (event_id + account_id + api_key_id + model + provider).isprintable()
        and not (event_id.isspace() or account_id.isspace())
        and not (model.isspace() or provider.isspace())
        # token counts: not negative, within the limit, subsets within their totals
        and min(cached_input_tokens, cache_write_5m_tokens, cache_write_1h_tokens) >= 0
        and cached_or_written <= input_tokens <= token_max
        and 0 <= reasoning_tokens <= output_tokens <= token_max
        # timings, status, raw usage, time
        and 0 <= ttft_ms <= _MAX_LATENCY_MS
        and 0 <= latency_ms <= _MAX_LATENCY_MS
        and (latency_ms == 0 or ttft_ms <= latency_ms)
        and status is not None
        and len(provider_usage_json.encode()) <= rules.max_provider_usage_bytes
        and occurred_at is not None
        and now - rules.max_past <= occurred_at <= now + rules.max_future
    )
    if not well_formed:
        problems = _problems(event, now=now, rules=rules, occurred_at=occurred_at)
        if problems:
            raise InvalidEvent("; ".join(problems))
    assert occurred_at is not None and status is not None  # else there were problems
    usage = TokenUsage(  # in the order of TOKEN_FIELDS
        input_tokens,
        cached_input_tokens,
        cache_write_5m_tokens,
        cache_write_1h_tokens,
        output_tokens,
        reasoning_tokens,
    )
    return UsageRecord(  # in the order of its fields
        event_id,
        account_id,
        api_key_id,
        model,
        provider,
        occurred_at,
        usage,
        latency_ms,
        ttft_ms,
        status,
        provider_usage_json,
    )


def _occurred_at(event: usage_pb2.UsageEvent) -> datetime | None:
    """``occurred_at`` as an aware UTC datetime, as ``Timestamp.ToDatetime`` gives it;
    None if it is missing or out of a Timestamp's range."""
    if not event.HasField("occurred_at"):
        return None
    seconds, nanos = event.occurred_at.seconds, event.occurred_at.nanos
    if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
        return None
    return _EPOCH + timedelta(0, seconds, nanos // 1000)  # days, seconds, microseconds


def _problems(
    event: usage_pb2.UsageEvent, *, now: datetime, rules: EventRules, occurred_at: datetime | None
) -> list[str]:
    """Every rule the event breaks, in the words given back to the reporter."""
    problems: list[str] = []
    for name, limit, required in (
        ("event_id", rules.max_id_length, True),
        ("account_id", rules.max_id_length, True),
        ("api_key_id", rules.max_id_length, False),
        ("model", rules.max_name_length, True),
        ("provider", rules.max_name_length, True),
    ):
        value: str = getattr(event, name)
        if not value.strip():
            if required:
                problems.append(f"{name} is missing")
        elif len(value) > limit:
            problems.append(f"{name} is longer than {limit} characters ({len(value)})")
        elif not value.isprintable():
            problems.append(f"{name} contains control characters")

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

    if event.status not in _STATUS_NAMES:
        problems.append(f"status {event.status} is not a known RequestStatus")

    if len(event.provider_usage_json.encode()) > rules.max_provider_usage_bytes:
        problems.append(
            f"provider_usage_json is larger than {rules.max_provider_usage_bytes} bytes"
        )

    if not event.HasField("occurred_at"):
        problems.append("occurred_at is missing")
    elif occurred_at is None:
        problems.append(
            f"occurred_at is not a valid timestamp (seconds {event.occurred_at.seconds}, "
            f"nanos {event.occurred_at.nanos})"
        )
    elif occurred_at < now - rules.max_past:
        problems.append(
            f"occurred_at {occurred_at.isoformat()} is more than "
            f"{rules.max_past.days} days in the past"
        )
    elif occurred_at > now + rules.max_future:
        problems.append(
            f"occurred_at {occurred_at.isoformat()} is more than "
            f"{int(rules.max_future.total_seconds())} s in the future"
        )
    return problems
