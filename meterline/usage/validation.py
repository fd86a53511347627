"""Turn a wire ``UsageEvent`` into a checked domain event, or say why not.

Ingest uses this to reject an event with its reason; the pricing pipeline
uses it again, against the Kafka record's timestamp, to dead-letter what
slipped past (another producer, an older ingest). Both give the same reasons.
Ingest validates against the instant it then gives the record as its
timestamp, so the pipeline's second look reaches the same verdict.

An event may leave its token counts at zero and carry the provider's
``usage`` object instead (OpenAI Chat Completions or Responses, Anthropic
Messages); the counts then come from :mod:`meterline.usage.adapters`. When
it carries both, they must agree: a gateway that copied Anthropic's
``input_tokens`` (cache reads and writes excluded) is told so.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from meterline.lib.settings import EventRules
from meterline.tokens import TOKEN_FIELDS, TokenUsage
from meterline.usage.adapters import AmbiguousUsage, UsageShapeError, usage_from_json
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


#: The rules an event can break, as :attr:`InvalidEvent.rule` names them: a
#: small, fixed set, fit for a metric label (the reason text is not).
RULES = (
    "undecodable",
    "missing",
    "too_long",
    "not_printable",
    "negative_tokens",
    "too_many_tokens",
    "cache_exceeds_input",
    "reasoning_exceeds_output",
    "bad_latency",
    "ttft_exceeds_latency",
    "unknown_status",
    "provider_usage_too_large",
    "provider_usage_invalid",
    "provider_usage_contradicts",
    "occurred_at_missing",
    "occurred_at_invalid",
    "too_old",
    "too_far_ahead",
)


class InvalidEvent(ValueError):
    """An event that cannot be billed; ``str(exc)`` is the reason given back.

    ``rule`` names the first rule it breaks, one of :data:`RULES` (or
    ``"invalid"`` when raised without one).
    """

    def __init__(self, reason: str, *, rule: str = "invalid") -> None:
        super().__init__(reason)
        self.rule = rule


class UndecodableEvent(InvalidEvent):
    """One event of a request whose bytes are not a UsageEvent; the others may be.

    ``event_id`` is the event's id when it could be read, else empty.
    """

    def __init__(self, reason: str, *, event_id: str = "") -> None:
        super().__init__(reason, rule="undecodable")
        self.event_id = event_id


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
        raise InvalidEvent(
            "empty record: expected a protobuf meterline.v1.UsageEvent", rule="undecodable"
        )
    event = _parse(value)
    if not event.event_id and len(unknown_fields.UnknownFieldSet(event)):
        raise InvalidEvent(
            "not a protobuf meterline.v1.UsageEvent: only unknown fields", rule="undecodable"
        )
    return event


def decode_events(data: bytes) -> list[usage_pb2.UsageEvent | UndecodableEvent]:
    """The events of a message whose field 1 is ``repeated UsageEvent``, one by one.

    For a ``ReportUsageRequest`` or ``StreamUsageRequest`` that protobuf will
    not parse whole (it refuses invalid UTF-8 in any string field): each event
    is parsed on its own from the wire bytes, and one that does not parse is
    an :class:`UndecodableEvent` in its place, so the others can still be
    taken. Other fields are skipped. Raises :class:`InvalidEvent` if ``data``
    is not a protobuf message at all (truncated, a malformed tag).
    """
    events: list[usage_pb2.UsageEvent | UndecodableEvent] = []
    for number, wire_type, start, end in _wire_fields(data):
        if number != 1:
            continue
        if wire_type != _LENGTH_DELIMITED:
            raise InvalidEvent(
                f"field 1 (events) has wire type {wire_type}, not a message", rule="undecodable"
            )
        value = data[start:end]
        try:
            events.append(_parse(value))
        except InvalidEvent as exc:
            events.append(UndecodableEvent(str(exc), event_id=_readable_event_id(value)))
    return events


_LENGTH_DELIMITED = 2
#: UsageEvent's string fields by number, to say which one holds invalid UTF-8
_STRING_FIELDS = {
    f.number: f.name for f in usage_pb2.UsageEvent.DESCRIPTOR.fields if f.type == f.TYPE_STRING
}


def _parse(value: bytes) -> usage_pb2.UsageEvent:
    try:
        return usage_pb2.UsageEvent.FromString(value)
    except DecodeError as exc:
        bad_text = _invalid_utf8_field(value)
        if bad_text is not None:
            raise InvalidEvent(
                f"not a valid UsageEvent: invalid UTF-8 in a string field ({bad_text})",
                rule="undecodable",
            ) from exc
        raise InvalidEvent(
            f"not a protobuf meterline.v1.UsageEvent: {exc}", rule="undecodable"
        ) from exc


def _invalid_utf8_field(value: bytes) -> str | None:
    """The name of the first string field of an event that is not UTF-8, if any."""
    try:
        for number, wire_type, start, end in _wire_fields(value):
            if wire_type == _LENGTH_DELIMITED and number in _STRING_FIELDS:
                try:
                    value[start:end].decode()
                except UnicodeDecodeError:
                    return _STRING_FIELDS[number]
    except InvalidEvent:
        pass
    return None


def _readable_event_id(value: bytes) -> str:
    """An undecodable event's ``event_id`` (field 1), to answer for it by name."""
    event_id = ""
    try:
        for number, wire_type, start, end in _wire_fields(value):
            if number == 1 and wire_type == _LENGTH_DELIMITED:
                event_id = value[start:end].decode()  # the last one wins, as in protobuf
    except (InvalidEvent, UnicodeDecodeError):
        return ""
    return event_id


def _wire_fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end) of each field of a protobuf message.

    The value is ``data[start:end]``: a varint's bytes, 8 or 4 fixed bytes, or
    a length-delimited field's payload. Raises :class:`InvalidEvent` if the
    bytes are not a message (groups, deprecated since proto2, included).
    """
    pos, size = 0, len(data)
    while pos < size:
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise InvalidEvent("not a protobuf message: field number 0", rule="undecodable")
        if wire_type == 0:
            start = pos
            _, pos = _varint(data, pos)
        elif wire_type == 1 or wire_type == 5:
            start = pos
            pos += 8 if wire_type == 1 else 4
        elif wire_type == _LENGTH_DELIMITED:
            length, start = _varint(data, pos)
            pos = start + length
        else:
            raise InvalidEvent(
                f"not a protobuf message: wire type {wire_type} (field {number})",
                rule="undecodable",
            )
        if pos > size:
            raise InvalidEvent(
                f"not a protobuf message: field {number} is truncated", rule="undecodable"
            )
        yield number, wire_type, start, pos


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    result = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise InvalidEvent("not a protobuf message: a truncated or overlong varint", rule="undecodable")


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
            raise InvalidEvent("; ".join(text for _, text in problems), rule=problems[0][0])
    assert occurred_at is not None and status is not None  # else there were problems
    usage = TokenUsage(  # in the order of TOKEN_FIELDS
        input_tokens,
        cached_input_tokens,
        cache_write_5m_tokens,
        cache_write_1h_tokens,
        output_tokens,
        reasoning_tokens,
    )
    if provider_usage_json:
        usage = _with_provider_usage(usage, provider_usage_json, rules)
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


_NO_TOKENS = TokenUsage()


def _with_provider_usage(usage: TokenUsage, text: str, rules: EventRules) -> TokenUsage:
    """The counts of an event that carries its provider's ``usage`` object.

    Counts all zero: those of the usage object, if it is one of a known API.
    Counts given: the usage object, if it is one, must say the same. A usage
    object of a known API that is not a valid one is refused either way; one
    that mixes two APIs is refused only when the counts must come from it.
    """
    try:
        found = usage_from_json(text)
    except AmbiguousUsage as exc:
        if usage != _NO_TOKENS:
            return usage  # the gateway's counts stand; the object is kept for audit
        raise InvalidEvent(
            f"no token counts, and provider_usage_json cannot give them: {exc}",
            rule="provider_usage_invalid",
        ) from exc
    except UsageShapeError as exc:
        raise InvalidEvent(f"provider_usage_json: {exc}", rule="provider_usage_invalid") from exc
    if found is None:
        return usage
    kind, reported = found
    if usage == _NO_TOKENS:
        for name in TOKEN_FIELDS:
            count = getattr(reported, name)
            if count > rules.max_tokens:
                raise InvalidEvent(
                    f"{name} from provider_usage_json ({kind}) is {count}, "
                    f"above the limit of {rules.max_tokens}",
                    rule="too_many_tokens",
                )
        return reported
    if usage != reported:
        differences = ", ".join(
            f"{name} {getattr(reported, name)} (given {getattr(usage, name)})"
            for name in TOKEN_FIELDS
            if getattr(usage, name) != getattr(reported, name)
        )
        hint = ""
        if kind == "anthropic.messages" and usage.input_tokens != reported.input_tokens:
            hint = (
                "; Anthropic's input_tokens exclude cache reads and writes, "
                "meterline's input_tokens include them"
            )
        raise InvalidEvent(
            f"token counts contradict provider_usage_json: its {kind} usage says "
            f"{differences}{hint}; send zero counts to have them taken from it",
            rule="provider_usage_contradicts",
        )
    return usage


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
) -> list[tuple[str, str]]:
    """Every rule the event breaks: (its name in :data:`RULES`, the words given back)."""
    problems: list[tuple[str, str]] = []
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
                problems.append(("missing", f"{name} is missing"))
        elif len(value) > limit:
            problems.append(
                ("too_long", f"{name} is longer than {limit} characters ({len(value)})")
            )
        elif not value.isprintable():
            problems.append(("not_printable", f"{name} contains control characters"))

    counts = {name: getattr(event, name) for name in TOKEN_FIELDS}
    for name, count in counts.items():
        if count < 0:
            problems.append(("negative_tokens", f"{name} is negative ({count})"))
        elif count > rules.max_tokens:
            problems.append(
                ("too_many_tokens", f"{name} is {count}, above the limit of {rules.max_tokens}")
            )
    if all(count >= 0 for count in counts.values()):  # else the subsets say nothing more
        cache = (
            counts["cached_input_tokens"]
            + counts["cache_write_5m_tokens"]
            + counts["cache_write_1h_tokens"]
        )
        if cache > counts["input_tokens"]:
            problems.append(
                (
                    "cache_exceeds_input",
                    f"cached and cache-write tokens ({cache}) exceed input_tokens "
                    f"({counts['input_tokens']}); input_tokens must include them",
                )
            )
        if counts["reasoning_tokens"] > counts["output_tokens"]:
            problems.append(
                (
                    "reasoning_exceeds_output",
                    f"reasoning_tokens ({counts['reasoning_tokens']}) exceed output_tokens "
                    f"({counts['output_tokens']}); output_tokens must include them",
                )
            )

    for name in ("latency_ms", "ttft_ms"):
        timing: int = getattr(event, name)
        if not 0 <= timing <= _MAX_LATENCY_MS:
            problems.append(("bad_latency", f"{name} is {timing}, outside 0..{_MAX_LATENCY_MS}"))
    if 0 < event.latency_ms < event.ttft_ms:
        problems.append(
            (
                "ttft_exceeds_latency",
                f"ttft_ms ({event.ttft_ms}) exceeds latency_ms ({event.latency_ms})",
            )
        )

    if event.status not in _STATUS_NAMES:
        problems.append(("unknown_status", f"status {event.status} is not a known RequestStatus"))

    if len(event.provider_usage_json.encode()) > rules.max_provider_usage_bytes:
        problems.append(
            (
                "provider_usage_too_large",
                f"provider_usage_json is larger than {rules.max_provider_usage_bytes} bytes",
            )
        )

    if not event.HasField("occurred_at"):
        problems.append(("occurred_at_missing", "occurred_at is missing"))
    elif occurred_at is None:
        problems.append(
            (
                "occurred_at_invalid",
                f"occurred_at is not a valid timestamp (seconds {event.occurred_at.seconds}, "
                f"nanos {event.occurred_at.nanos})",
            )
        )
    elif occurred_at < now - rules.max_past:
        problems.append(
            (
                "too_old",
                f"occurred_at {occurred_at.isoformat()} is more than "
                f"{_span(rules.max_past)} in the past",
            )
        )
    elif occurred_at > now + rules.max_future:
        problems.append(
            (
                "too_far_ahead",
                f"occurred_at {occurred_at.isoformat()} is more than "
                f"{_span(rules.max_future)} in the future",
            )
        )
    return problems


def _span(span: timedelta) -> str:
    """A lateness bound as a reporter reads it: "35 days", "300 s"."""
    if span >= timedelta(days=1) and span % timedelta(days=1) == timedelta(0):
        return f"{span.days} days"
    return f"{span.total_seconds():g} s"
