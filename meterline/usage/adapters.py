"""Provider ``usage`` objects -> :class:`~meterline.catalog.pricing.TokenUsage`, in one place.

meterline counts tokens the way OpenAI's ``usage`` does: input includes cache
reads and writes, output includes reasoning. Anthropic's Messages API reports
``input_tokens`` *excluding* cache reads (``cache_read_input_tokens``) and
cache writes (``cache_creation_input_tokens``); adding them back here, and
nowhere else, is what keeps a cached Anthropic request from being billed as
if its cache reads were full-price input (or not billed at all).

:func:`usage_from_json` tells the APIs' objects apart by the names only one
of them uses, so validation can take the counts of an event from the usage
object it carries (or check them against it): one definition for ingest and
the pricing pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from meterline.tokens import TokenUsage

Usage = Mapping[str, Any]


class UsageShapeError(ValueError):
    """A usage object that does not have the shape its API documents."""


class AmbiguousUsage(UsageShapeError):
    """A usage object with names of two APIs, so no one knows which semantics it has.

    Proxies that rename fields produce these (OpenAI's ``prompt_tokens`` beside
    Anthropic's ``cache_creation_input_tokens``): whether ``prompt_tokens``
    includes the cache writes depends on the proxy's version.
    """


def _count(usage: Usage | None, *path: str) -> int:
    """The non-negative integer at ``path``; absent or null counts are 0."""
    value: Any = usage
    for key in path:
        if value is None:
            return 0
        if not isinstance(value, Mapping):
            raise UsageShapeError(f"{'.'.join(path[:-1])} is not an object")
        value = value.get(key)
    name = ".".join(path)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UsageShapeError(f"{name} is not a number: {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise UsageShapeError(f"{name} is not a whole number: {value!r}")
        value = int(value)
    if value < 0:
        raise UsageShapeError(f"{name} is negative: {value}")
    return int(value)


def _checked(usage: TokenUsage, api: str) -> TokenUsage:
    cache = usage.cached_input_tokens + usage.cache_write_5m_tokens + usage.cache_write_1h_tokens
    if cache > usage.input_tokens:
        raise UsageShapeError(
            f"{api}: cached tokens ({cache}) exceed input tokens ({usage.input_tokens})"
        )
    if usage.reasoning_tokens > usage.output_tokens:
        raise UsageShapeError(
            f"{api}: reasoning tokens ({usage.reasoning_tokens}) exceed output tokens "
            f"({usage.output_tokens})"
        )
    return usage


def from_openai_chat(usage: Usage) -> TokenUsage:
    """OpenAI Chat Completions: ``prompt_tokens`` already include ``cached_tokens``."""
    return _checked(
        TokenUsage(
            input_tokens=_count(usage, "prompt_tokens"),
            cached_input_tokens=_count(usage, "prompt_tokens_details", "cached_tokens"),
            output_tokens=_count(usage, "completion_tokens"),
            reasoning_tokens=_count(usage, "completion_tokens_details", "reasoning_tokens"),
        ),
        "openai.chat",
    )


def from_openai_responses(usage: Usage) -> TokenUsage:
    """OpenAI Responses API: same semantics, other names."""
    return _checked(
        TokenUsage(
            input_tokens=_count(usage, "input_tokens"),
            cached_input_tokens=_count(usage, "input_tokens_details", "cached_tokens"),
            output_tokens=_count(usage, "output_tokens"),
            reasoning_tokens=_count(usage, "output_tokens_details", "reasoning_tokens"),
        ),
        "openai.responses",
    )


def from_anthropic(usage: Usage) -> TokenUsage:
    """Anthropic Messages API: input excludes cache reads and writes, so add them.

    Cache writes are split by TTL in ``cache_creation``; without that breakdown,
    or with one of zeros, every write is a 5-minute write, Anthropic's default TTL.
    """
    uncached = _count(usage, "input_tokens")
    reads = _count(usage, "cache_read_input_tokens")
    writes = _count(usage, "cache_creation_input_tokens")
    write_5m = _count(usage, "cache_creation", "ephemeral_5m_input_tokens")
    write_1h = _count(usage, "cache_creation", "ephemeral_1h_input_tokens")
    if write_5m + write_1h == 0:
        # No breakdown, or one of zeros (or nulls) beside a non-zero total, as
        # some API versions and proxies send: the writes used the default TTL.
        write_5m, write_1h = writes, 0
    elif writes and write_5m + write_1h != writes:
        raise UsageShapeError(
            f"anthropic.messages: cache_creation ({write_5m} + {write_1h}) does not add up "
            f"to cache_creation_input_tokens ({writes})"
        )
    return _checked(
        TokenUsage(
            input_tokens=uncached + reads + write_5m + write_1h,
            cached_input_tokens=reads,
            cache_write_5m_tokens=write_5m,
            cache_write_1h_tokens=write_1h,
            output_tokens=_count(usage, "output_tokens"),
        ),
        "anthropic.messages",
    )


ADAPTERS: dict[str, Callable[[Usage], TokenUsage]] = {
    "openai.chat": from_openai_chat,
    "openai.responses": from_openai_responses,
    "anthropic.messages": from_anthropic,
}


def from_provider(kind: str, usage: Usage) -> TokenUsage:
    """Convert ``usage`` from the API named by ``kind`` (a key of :data:`ADAPTERS`)."""
    try:
        adapter = ADAPTERS[kind]
    except KeyError:
        raise ValueError(
            f"no usage adapter for {kind!r}; known: {', '.join(sorted(ADAPTERS))}"
        ) from None
    if not isinstance(usage, Mapping):
        raise UsageShapeError(f"{kind}: usage is not an object")
    return adapter(usage)


#: Names that only one API's usage object has (the Responses API and Anthropic
#: share ``input_tokens`` and ``output_tokens``).
_ONLY_IN: dict[str, tuple[str, ...]] = {
    "openai.chat": (
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
    ),
    "openai.responses": ("input_tokens_details", "output_tokens_details"),
    "anthropic.messages": (
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "cache_creation",
    ),
}
_SHARED = ("input_tokens", "output_tokens")


def usage_kind(usage: Usage) -> str | None:
    """Which API's ``usage`` object this is (a key of :data:`ADAPTERS`), or None.

    An object with only the shared ``input_tokens`` and ``output_tokens`` reads
    the same as either; it is the Responses API's when it has ``total_tokens``
    (Anthropic never sends one). Raises :class:`AmbiguousUsage` for an object
    with names that only two different APIs use.
    """
    kinds = [kind for kind, names in _ONLY_IN.items() if any(n in usage for n in names)]
    if "openai.chat" in kinds and any(n in usage for n in _SHARED):
        kinds.append("openai.responses or anthropic.messages")
    if len(kinds) > 1:
        raise AmbiguousUsage(
            f"usage object mixes the names of {' and '.join(kinds)}; "
            "its token semantics are unknown"
        )
    if kinds:
        return kinds[0]
    if any(n in usage for n in _SHARED):
        return "openai.responses" if "total_tokens" in usage else "anthropic.messages"
    return None


def usage_from_json(text: str) -> tuple[str, TokenUsage] | None:
    """The API and the token counts of a provider ``usage`` object given as JSON.

    None when ``text`` is not such an object: not JSON, not an object, or the
    shape of an API with no adapter here (kept for audit, counts unknown).
    Raises :class:`UsageShapeError` for an object of a known API that is not
    a valid one, :class:`AmbiguousUsage` for one that mixes two APIs.
    """
    if not text.lstrip().startswith("{"):  # quick: most events carry none, or no object
        return None
    try:
        usage = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses
        return None
    if not isinstance(usage, dict):
        return None
    kind = usage_kind(usage)
    if kind is None:
        return None
    return kind, ADAPTERS[kind](usage)
