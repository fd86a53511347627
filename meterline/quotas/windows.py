"""The time windows of a quota, defined once: every check, settle, rebuild and report
uses these.

Calendar days and months are the account's: a month in ``Asia/Tokyo`` starts
at Tokyo's midnight of the 1st (15:00 UTC the day before), one in
``America/Los_Angeles`` at 08:00 UTC (07:00 in summer). A minute is not a
calendar window: per-minute limits roll (each request is judged against the
60 s before it).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

__all__ = ["ROLLING_MINUTE", "Window", "window_bounds", "window_id"]

#: The span of the rolling per-minute limits.
ROLLING_MINUTE = timedelta(minutes=1)


class Window(StrEnum):
    DAY = "day"
    MONTH = "month"


def window_bounds(window: Window, at: datetime, timezone: str) -> tuple[datetime, datetime]:
    """[start, end) of the calendar ``window`` holding ``at``, in the account's ``timezone``,
    as UTC instants. DST days last 23 or 25 hours."""
    zone = ZoneInfo(timezone)
    local = at.astimezone(zone)
    if window is Window.DAY:
        start = datetime(local.year, local.month, local.day)
        following = start + timedelta(days=1)
    else:
        start = datetime(local.year, local.month, 1)
        following = datetime(local.year + (local.month == 12), local.month % 12 + 1, 1)
    # a local midnight that does not exist (a DST gap at 00:00) is the instant after it
    return (
        start.replace(tzinfo=zone).astimezone(UTC),
        following.replace(tzinfo=zone).astimezone(UTC),
    )


def window_id(window: Window, at: datetime, timezone: str) -> str:
    """A window's name for counter keys: ``2026-12-01`` (day) or ``2026-12`` (month),
    in the account's calendar."""
    local = at.astimezone(ZoneInfo(timezone))
    return local.strftime("%Y-%m-%d" if window is Window.DAY else "%Y-%m")
