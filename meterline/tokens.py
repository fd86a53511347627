"""Token counts of one request: the vocabulary every slice shares.

Semantics follow OpenAI's ``usage``: ``input_tokens`` counts every prompt
token, cache reads and writes included, and the cache counts are subsets of
it; ``reasoning_tokens`` is a subset of ``output_tokens``. Providers that
report differently (Anthropic) are converted by :mod:`meterline.usage.adapters`.
"""

from __future__ import annotations

from typing import NamedTuple


class TokenUsage(NamedTuple):
    """Token counts of one request, in OpenAI semantics (see module docstring).

    A named tuple: one is made for every event on the hot path, and a tuple
    is several times quicker to make than a frozen dataclass.
    """

    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_5m_tokens: int = 0
    cache_write_1h_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def uncached_input_tokens(self) -> int:
        """Prompt tokens neither read from nor written to a cache."""
        return (
            self.input_tokens
            - self.cached_input_tokens
            - self.cache_write_5m_tokens
            - self.cache_write_1h_tokens
        )


#: The token counts of a request, by name: the same in the proto, the warehouse and the API.
TOKEN_FIELDS: tuple[str, ...] = TokenUsage._fields
