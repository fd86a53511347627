"""Provider usage shapes -> OpenAI token semantics, on the APIs' documented responses."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Unpack

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from conftest import Counts
from meterline.catalog.pricing import PriceVersion, Rates
from meterline.lib.settings import EventRules
from meterline.tokens import TokenUsage
from meterline.usage import InvalidEvent, validate
from meterline.usage.adapters import (
    AmbiguousUsage,
    UsageShapeError,
    from_anthropic,
    from_openai_chat,
    from_openai_responses,
    from_provider,
    usage_from_json,
)
from meterline.v1 import usage_pb2

# A chat completion as OpenAI documents it (the response object's `usage`).
OPENAI_CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "..."}, "finish_reason": "stop"}
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
}

# A Responses API response from a reasoning model.
OPENAI_RESPONSES_RESPONSE: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "model": "o4-mini-2025-04-16",
    "usage": {
        "input_tokens": 2328,
        "input_tokens_details": {"cached_tokens": 2048},
        "output_tokens": 1450,
        "output_tokens_details": {"reasoning_tokens": 1024},
        "total_tokens": 3778,
    },
}

# An Anthropic Messages response with prompt caching, 1-hour and 5-minute writes.
ANTHROPIC_RESPONSE: dict[str, Any] = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5-20250929",
    "content": [{"type": "text", "text": "..."}],
    "stop_reason": "end_turn",
    "usage": {
        "input_tokens": 21,
        "cache_creation_input_tokens": 1500,
        "cache_read_input_tokens": 3000,
        "cache_creation": {"ephemeral_5m_input_tokens": 500, "ephemeral_1h_input_tokens": 1000},
        "output_tokens": 393,
        "service_tier": "standard",
    },
}


def test_openai_chat_completion_usage() -> None:
    assert from_openai_chat(OPENAI_CHAT_RESPONSE["usage"]) == TokenUsage(
        input_tokens=1117, cached_input_tokens=1024, output_tokens=46
    )


def test_openai_responses_usage() -> None:
    assert from_openai_responses(OPENAI_RESPONSES_RESPONSE["usage"]) == TokenUsage(
        input_tokens=2328, cached_input_tokens=2048, output_tokens=1450, reasoning_tokens=1024
    )


def test_anthropic_input_gets_its_cache_reads_and_writes_back() -> None:
    usage = from_anthropic(ANTHROPIC_RESPONSE["usage"])
    assert usage == TokenUsage(
        input_tokens=21 + 3000 + 1500,
        cached_input_tokens=3000,
        cache_write_5m_tokens=500,
        cache_write_1h_tokens=1000,
        output_tokens=393,
    )
    assert usage.uncached_input_tokens == 21


def test_anthropic_writes_without_a_breakdown_are_5_minute_writes() -> None:
    usage = from_anthropic(
        {
            "input_tokens": 10,
            "cache_creation_input_tokens": 200,
            "cache_read_input_tokens": 0,
            "output_tokens": 5,
        }
    )
    assert (usage.input_tokens, usage.cache_write_5m_tokens, usage.cache_write_1h_tokens) == (
        210,
        200,
        0,
    )


def test_minimal_and_null_details_count_as_zero() -> None:
    assert from_openai_chat(
        {"prompt_tokens": 9, "completion_tokens": 12, "prompt_tokens_details": None}
    ) == TokenUsage(9, 0, 0, 0, 12, 0)
    assert from_anthropic(
        {"input_tokens": 4, "output_tokens": 2, "cache_creation": None}
    ) == TokenUsage(input_tokens=4, output_tokens=2)


def test_the_same_request_in_both_shapes_is_the_same_usage_and_the_same_price() -> None:
    openai_shaped = from_openai_chat(
        {
            "prompt_tokens": 10_000,
            "completion_tokens": 800,
            "prompt_tokens_details": {"cached_tokens": 6_000},
        }
    )
    anthropic_shaped = from_anthropic(
        {
            "input_tokens": 4_000,
            "cache_read_input_tokens": 6_000,
            "cache_creation_input_tokens": 0,
            "output_tokens": 800,
        }
    )
    assert openai_shaped == anthropic_shaped

    price = PriceVersion(
        model="claude-sonnet-4-5",
        provider="anthropic",
        effective_from=datetime(2025, 1, 1, tzinfo=UTC),
        rates=Rates(
            input=Decimal(3),
            output=Decimal(15),
            cache_read=Decimal("0.30"),
            cache_write_5m=Decimal("3.75"),
            cache_write_1h=Decimal(6),
        ),
    ).compile()
    # 4,000 × $3 + 6,000 × $0.30 + 800 × $15 per million = $0.0258
    assert price.cost(anthropic_shaped).picos == 25_800_000_000
    # the documented response: 21 × 3 + 3,000 × 0.30 + 500 × 3.75 + 1,000 × 6 + 393 × 15
    assert (
        price.cost(from_anthropic(ANTHROPIC_RESPONSE["usage"])).picos
        == (63 + 900 + 1875 + 6000 + 5895) * 10**6
    )


@pytest.mark.parametrize(
    ("kind", "usage", "message"),
    [
        ("openai.chat", {"prompt_tokens": -1}, "prompt_tokens is negative"),
        ("openai.chat", {"prompt_tokens": "12"}, "prompt_tokens is not a number"),
        ("openai.chat", {"prompt_tokens": True}, "prompt_tokens is not a number"),
        ("openai.chat", {"prompt_tokens": 1.5}, "not a whole number"),
        (
            "openai.chat",
            {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}},
            "cached tokens (11) exceed input tokens (10)",
        ),
        (
            "openai.responses",
            {"output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 2}},
            "reasoning tokens (2) exceed output tokens (1)",
        ),
        (
            "anthropic.messages",
            {"cache_creation_input_tokens": 10, "cache_creation": {"ephemeral_5m_input_tokens": 3}},
            "does not add up",
        ),
        ("openai.chat", ["not", "an", "object"], "usage is not an object"),
    ],
)
def test_bad_shapes_are_refused_with_the_field_named(
    kind: str, usage: object, message: str
) -> None:
    with pytest.raises(UsageShapeError, match=re.escape(message)):
        from_provider(kind, usage)  # type: ignore[arg-type]


def test_unknown_api_kind() -> None:
    with pytest.raises(ValueError, match=re.escape("no usage adapter for 'cohere.chat'")):
        from_provider("cohere.chat", {})


def test_anthropic_writes_with_a_zero_breakdown_are_5_minute_writes() -> None:
    """Seen in the wild: a total of writes beside a breakdown of zeros (or nulls)."""
    for breakdown in (
        {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
        {"ephemeral_5m_input_tokens": None, "ephemeral_1h_input_tokens": None},
        {},
    ):
        usage = from_anthropic(
            {
                "input_tokens": 10,
                "cache_creation_input_tokens": 200,
                "cache_read_input_tokens": 30,
                "cache_creation": breakdown,
                "output_tokens": 5,
            }
        )
        assert usage == TokenUsage(
            input_tokens=240, cached_input_tokens=30, cache_write_5m_tokens=200, output_tokens=5
        ), breakdown


# --- the usage object an event carries, told apart and applied by validation -------------


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (OPENAI_CHAT_RESPONSE, "openai.chat"),
        (OPENAI_RESPONSES_RESPONSE, "openai.responses"),
        (ANTHROPIC_RESPONSE, "anthropic.messages"),
    ],
)
def test_each_apis_usage_object_is_recognised_by_its_own_names(
    response: dict[str, Any], kind: str
) -> None:
    assert usage_from_json(json.dumps(response["usage"])) == (
        kind,
        from_provider(kind, response["usage"]),
    )


def test_the_shared_names_alone_read_the_same_in_either_api() -> None:
    minimal = {"input_tokens": 7, "output_tokens": 3}
    assert usage_from_json(json.dumps(minimal)) == (
        "anthropic.messages",
        TokenUsage(input_tokens=7, output_tokens=3),
    )
    assert usage_from_json(json.dumps(minimal | {"total_tokens": 10})) == (
        "openai.responses",
        TokenUsage(input_tokens=7, output_tokens=3),
    )


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[1, 2]", '{"promptTokenCount": 12}', '"a string"', "{" * 5_000],
)
def test_text_that_is_no_known_usage_object_gives_nothing(text: str) -> None:
    assert usage_from_json(text) is None


def test_a_usage_object_mixing_two_apis_is_ambiguous() -> None:
    with pytest.raises(AmbiguousUsage, match=re.escape("openai.chat and anthropic.messages")):
        usage_from_json('{"prompt_tokens": 100, "cache_creation_input_tokens": 40}')


RULES = EventRules()
NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def carrying(usage: object, **counts: Unpack[Counts]) -> usage_pb2.UsageEvent:
    """An event with ``usage`` as its provider_usage_json."""
    occurred = Timestamp()
    occurred.FromDatetime(NOW)
    return usage_pb2.UsageEvent(
        event_id="e-1",
        occurred_at=occurred,
        account_id="acct-1",
        model="some-model",
        provider="some-provider",
        status=usage_pb2.REQUEST_STATUS_OK,
        provider_usage_json=usage if isinstance(usage, str) else json.dumps(usage),
        **counts,
    )


@pytest.mark.parametrize(
    "response", [OPENAI_CHAT_RESPONSE, OPENAI_RESPONSES_RESPONSE, ANTHROPIC_RESPONSE]
)
def test_an_event_without_counts_is_billed_from_its_usage_object(
    response: dict[str, Any],
) -> None:
    _, expected = usage_from_json(json.dumps(response["usage"])) or ("", None)
    record = validate(carrying(response["usage"]), now=NOW, rules=RULES)
    assert record.usage == expected != TokenUsage()


def test_an_anthropic_event_without_counts_gets_cache_reads_and_writes_added_back() -> None:
    usage = dict(ANTHROPIC_RESPONSE["usage"])
    usage["cache_creation"] = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0}
    record = validate(carrying(usage), now=NOW, rules=RULES)
    assert record.usage == TokenUsage(
        input_tokens=4521, cached_input_tokens=3000, cache_write_5m_tokens=1500, output_tokens=393
    )


def test_counts_that_agree_with_the_usage_object_stand() -> None:
    record = validate(
        carrying(
            OPENAI_CHAT_RESPONSE["usage"],
            input_tokens=1117,
            cached_input_tokens=1024,
            output_tokens=46,
        ),
        now=NOW,
        rules=RULES,
    )
    assert record.usage == TokenUsage(1117, 1024, 0, 0, 46, 0)


def test_counts_that_contradict_the_usage_object_are_rejected_with_the_difference() -> None:
    # the commonest mis-billing: Anthropic's input_tokens copied as they are
    event = carrying(ANTHROPIC_RESPONSE["usage"], input_tokens=21, output_tokens=393)
    with pytest.raises(InvalidEvent) as rejected:
        validate(event, now=NOW, rules=RULES)
    assert rejected.value.rule == "provider_usage_contradicts"
    reason = str(rejected.value)
    assert reason.startswith(
        "token counts contradict provider_usage_json: its anthropic.messages usage says "
        "input_tokens 4521 (given 21), cached_input_tokens 3000 (given 0), "
        "cache_write_5m_tokens 500 (given 0), cache_write_1h_tokens 1000 (given 0); "
    )
    assert "Anthropic's input_tokens exclude cache reads and writes" in reason


def test_a_broken_usage_object_is_rejected_and_an_ambiguous_one_only_without_counts() -> None:
    with pytest.raises(InvalidEvent, match="prompt_tokens is negative") as broken:
        validate(carrying({"prompt_tokens": -3}, input_tokens=5), now=NOW, rules=RULES)
    assert broken.value.rule == "provider_usage_invalid"

    mixed = {"prompt_tokens": 100, "cache_read_input_tokens": 40}
    assert validate(carrying(mixed, input_tokens=100, cached_input_tokens=40), now=NOW, rules=RULES)
    with pytest.raises(InvalidEvent, match="no token counts, and provider_usage_json cannot"):
        validate(carrying(mixed), now=NOW, rules=RULES)


def test_counts_from_a_usage_object_respect_the_token_limit() -> None:
    with pytest.raises(InvalidEvent, match="above the limit") as rejected:
        validate(carrying({"prompt_tokens": RULES.max_tokens + 1}), now=NOW, rules=RULES)
    assert rejected.value.rule == "too_many_tokens"


def test_other_provider_usage_text_is_kept_and_changes_nothing() -> None:
    for text in ('{"promptTokenCount": 12}', "free text", ""):
        record = validate(carrying(text, input_tokens=12), now=NOW, rules=RULES)
        assert (record.usage.input_tokens, record.provider_usage_json) == (12, text)
