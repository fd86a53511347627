"""The alerts slice's HTTP edge: rules and the webhook as admins post them, alerts and
their delivery attempts as clients read them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator, model_validator

from meterline.alerts.model import Alert, AlertKind, Rule
from meterline.credits.schemas import picos_of
from meterline.money import format_usd

__all__ = ["AlertOut", "RuleIn", "RuleOut", "WebhookIn", "WebhookOut"]

#: Which fields each kind of rule takes (the others must be absent).
_FIELDS = {
    AlertKind.BALANCE_BELOW: {"threshold_usd"},
    AlertKind.CREDITS_EXPIRING: {"within_hours"},
    AlertKind.SPEND_SHARE: {"share_percent", "calendar"},
    AlertKind.TOKENS_SHARE: {"share_percent", "calendar"},
}
_ALL = {"threshold_usd", "within_hours", "share_percent", "calendar"}
_REQUIRED = {
    AlertKind.BALANCE_BELOW: {"threshold_usd"},
    AlertKind.CREDITS_EXPIRING: {"within_hours"},
    AlertKind.SPEND_SHARE: {"share_percent"},
    AlertKind.TOKENS_SHARE: {"share_percent"},
}


class RuleIn(BaseModel):
    """POST /v1/accounts/{account_id}/alerts/rules: one threshold."""

    model_config = ConfigDict(extra="forbid")

    kind: AlertKind = Field(
        description="balance_below (threshold_usd), credits_expiring (within_hours), "
        "spend_share or tokens_share (share_percent of the plan's cap, calendar)."
    )
    threshold_usd: int | None = Field(
        None,
        json_schema_extra={"type": "string", "example": "10.00"},
        description="balance_below: fires when what the account may spend falls below it.",
    )
    within_hours: Annotated[int, Field(ge=1, le=24 * 366)] | None = Field(
        None, description="credits_expiring: fires for each grant expiring within this."
    )
    share_percent: Annotated[int, Field(ge=1, le=1000)] | None = Field(
        None, description="spend_share, tokens_share: fires when usage reaches this % of the cap."
    )
    calendar: Literal["day", "month"] | None = Field(
        None, description="spend_share, tokens_share: which cap (default month)."
    )

    @field_validator("threshold_usd", mode="before")
    @classmethod
    def _threshold(cls, value: object) -> int | None:
        return None if value is None else picos_of(value, what="threshold_usd", signed=False)

    @model_validator(mode="after")
    def _fields_of_kind(self) -> Self:
        given = {name for name in _ALL if getattr(self, name) is not None}
        extra = sorted(given - _FIELDS[self.kind])
        if extra:
            raise ValueError(f"a {self.kind} rule takes no {', '.join(extra)}")
        missing = sorted(_REQUIRED[self.kind] - given)
        if missing:
            raise ValueError(f"a {self.kind} rule needs {', '.join(missing)}")
        if self.kind in (AlertKind.SPEND_SHARE, AlertKind.TOKENS_SHARE) and not self.calendar:
            self.calendar = "month"
        return self

    @property
    def within(self) -> timedelta | None:
        return None if self.within_hours is None else timedelta(hours=self.within_hours)


class RuleOut(BaseModel):
    rule_id: str
    kind: str
    threshold_usd: str | None
    within_hours: float | None
    share_percent: int | None
    calendar: str | None
    armed: bool = Field(description="balance_below: False once fired, until the balance is back.")
    created_at: str
    created_by: str

    @classmethod
    def of(cls, rule: Rule) -> Self:
        return cls(
            rule_id=rule.rule_id,
            kind=rule.kind.value,
            threshold_usd=None
            if rule.threshold_picos is None
            else format_usd(rule.threshold_picos),
            within_hours=None if rule.within is None else rule.within.total_seconds() / 3600,
            share_percent=rule.share_percent,
            calendar=rule.calendar,
            armed=rule.armed,
            created_at=rule.created_at.isoformat(),
            created_by=rule.created_by,
        )


class WebhookIn(BaseModel):
    """PUT /v1/accounts/{account_id}/alerts/webhook: where the account's alerts go."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(description="http or https, at most 2,048 characters.")

    @field_validator("url", mode="before")
    @classmethod
    def _short(cls, value: object) -> object:
        if isinstance(value, str) and len(value) > 2048:
            raise ValueError("url has at most 2,048 characters")
        return value


class WebhookOut(BaseModel):
    url: str
    signing_secret: str = Field(
        description="Verifies Meterline-Signature: HMAC-SHA256 of '<Meterline-Timestamp>.<body>'."
        " A new URL has a new secret."
    )


def _time(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat()


class AttemptOut(BaseModel):
    attempt: int
    at: str
    status: int | None = Field(description="The receiver's HTTP status; null when none came.")
    error: str


class DeliveryOut(BaseModel):
    channel: str
    state: str = Field(description="pending, delivered or failed (attempts exhausted).")
    next_attempt_at: str | None
    delivered_at: str | None
    attempts: list[AttemptOut]


class AlertOut(BaseModel):
    alert_id: str
    rule_id: str
    kind: str
    fired_at: str
    payload: dict[str, Any] = Field(description="What was sent.")
    deliveries: list[DeliveryOut]

    @classmethod
    def of(cls, alert: Alert) -> Self:
        return cls(
            alert_id=alert.alert_id,
            rule_id=alert.rule_id,
            kind=alert.kind.value,
            fired_at=alert.fired_at.isoformat(),
            payload=alert.payload,
            deliveries=[
                DeliveryOut(
                    channel=d.channel.value,
                    state=d.state,
                    next_attempt_at=_time(d.next_attempt_at),
                    delivered_at=_time(d.delivered_at),
                    attempts=[
                        AttemptOut(
                            attempt=a.attempt, at=a.at.isoformat(), status=a.status, error=a.error
                        )
                        for a in d.attempts
                    ],
                )
                for d in alert.deliveries
            ],
        )
