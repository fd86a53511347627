"""The usage slice's HTTP route: usage and cost of an account over a time range.

The report comes from an injected :data:`UsageQuery` (the application binds
it to its warehouse), run in a worker thread because warehouse calls block.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, cast

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.exceptions import ServiceUnavailableException, ValidationException
from litestar.params import FromPath, QueryParameter, SkipValidation

from meterline.accounts.http import ACCESS_ERRORS, KEY_REQUIRED, reads_account
from meterline.catalog.schemas import instant_parameter
from meterline.usage.report import DIMENSIONS, Dimension, UsageReport, month_start
from meterline.usage.schemas import UsageReportOut

__all__ = ["UsageController", "UsageQuery"]

#: (account_id, start, end, group_by) -> the report; raises ValueError for a bad range.
UsageQuery = Callable[[str, datetime, datetime, Sequence[Dimension]], UsageReport]


class UsageController(Controller):
    """Usage reports per account."""

    path = "/v1/accounts"
    tags = ("usage",)
    security = KEY_REQUIRED

    @get(
        "/{account_id:str}/usage",
        summary="Usage and cost of an account",
        guards=[reads_account],
        raises=[*ACCESS_ERRORS, ValidationException, ServiceUnavailableException],
    )
    async def account_usage(
        self,
        usage_query: NamedDependency[SkipValidation[UsageQuery]],
        account_id: FromPath[str],
        start: Annotated[
            str | None,
            QueryParameter(
                name="from",
                description="Start, inclusive, ISO 8601 (default: the month's start, UTC).",
                format="date-time",
                max_length=64,
            ),
        ] = None,
        end: Annotated[
            str | None,
            QueryParameter(
                name="to",
                description="End, exclusive, ISO 8601 (default: now).",
                format="date-time",
                max_length=64,
            ),
        ] = None,
        group_by: Annotated[
            list[str] | None,
            QueryParameter(description="Any of model, provider, day; repeat or comma-separate."),
        ] = None,
    ) -> UsageReportOut:
        """Requests, token counts, ``cost_usd`` and ``charge_usd`` for the range, in total and
        per group."""
        now = datetime.now(UTC)
        first = month_start(now) if start is None else instant_parameter("from", start)
        last = now if end is None else instant_parameter("to", end)
        dims = _dimensions(group_by or ())
        report = await asyncio.to_thread(usage_query, account_id, first, last, dims)
        return UsageReportOut.of(report)


def _dimensions(values: Sequence[str]) -> list[Dimension]:
    dims = [d.strip() for value in values for d in value.split(",") if d.strip()]
    unknown = [d[:64] for d in dims if d not in DIMENSIONS]
    if unknown:
        message = f"cannot group by {', '.join(unknown)}; choose from {', '.join(DIMENSIONS)}"
        raise ValidationException(
            message, extra=[{"key": "group_by", "message": message, "source": "query"}]
        )
    return cast(list[Dimension], dims)
