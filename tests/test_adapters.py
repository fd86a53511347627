"""Provider usage shapes -> OpenAI token semantics, on the APIs' documented responses."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from meterline.catalog.pricing import PriceVersion, Rates
from meterline.tokens import TokenUsage
from meterline.usage.adapters import (
    UsageShapeError,
    from_anthropic,
    from_openai_chat,
    from_openai_responses,
    from_provider,
)

# A chat completion as OpenAI documents it (the response object's `usage`).
OPENAI_CHAT_RESPONSE = {
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
OPENAI_RESPONSES_RESPONSE = {
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
ANTHROPIC_RESPONSE = {
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
