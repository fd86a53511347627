"""The usage slice's HTTP edge: the usage report as JSON.

Money is a decimal string (``"2.006002"``), never a float. Times are ISO
8601 text, bounded as every time the API takes
(:func:`meterline.catalog.schemas.parse_instant`).
"""

from __future__ import annotations

from typing import Annotated, Any, Self

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer

from meterline.usage.report import DIMENSIONS, UsageReport

__all__ = ["UsageGroupOut", "UsageReportOut", "UsageTotalsOut"]

_DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class UsageTotalsOut(BaseModel):
    """What a set of requests used and cost; token counts follow OpenAI's ``usage``."""

    requests: int
    unpriced_requests: int = Field(description="Kept with their tokens, not yet priced.")
    input_tokens: int = Field(description="Every prompt token, cache reads and writes included.")
    cached_input_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int
    output_tokens: int = Field(description="Reasoning tokens included.")
    reasoning_tokens: int
    cost_usd: str = Field(
        description="What the providers charge, US dollars, exact decimal text.",
        examples=["2.006002"],
    )
    charge_usd: str = Field(
        description="What the account pays: its plan's sell price over cost_usd (equal to it "
        "without a plan), US dollars, exact decimal text.",
        examples=["2.5085025"],
    )


class UsageGroupOut(UsageTotalsOut):
    """One group's totals, keyed by the dimensions asked for (only those appear)."""

    model: str | None = None
    provider: str | None = None
    day: str | None = Field(None, description="YYYY-MM-DD, UTC.")

    @model_serializer(mode="wrap")
    def _grouped_keys_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        keys = {d: data[d] for d in DIMENSIONS if data[d] is not None}
        return keys | {k: v for k, v in data.items() if k not in DIMENSIONS}


class UsageReportOut(BaseModel):
    """Usage of one account in [start, end), in total and per group."""

    account_id: str
    start: _DateTime
    end: _DateTime
    group_by: list[str]
    source: str = Field(description="Where the sums were read from.")
    totals: UsageTotalsOut
    groups: list[UsageGroupOut] = Field(description="Empty unless group_by was given.")

    @classmethod
    def of(cls, report: UsageReport) -> Self:
        return cls.model_validate(report.to_json())
