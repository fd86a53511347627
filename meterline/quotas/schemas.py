"""The plans slice's HTTP edge: plan versions and assignments as clients send and read them.

What a plan may say is the domain's rule, :class:`~meterline.quotas.plans.PlanTerms`
(limits, exact and bounded money, a decimal string and never a float):
:class:`PlanIn` is that model, and adds only what the edge and the store
need (no control characters in names, no NUL in model patterns, which
PostgreSQL cannot hold). Money is a decimal string both ways.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

from meterline.accounts.schemas import DisplayName
from meterline.catalog.schemas import Instant
from meterline.money import format_usd
from meterline.quotas.engine import LimitState
from meterline.quotas.plans import PlanId, PlanLimits, PlanTerms, PlanVersion
from meterline.quotas.store import Assignment

__all__ = [
    "MAX_VERSION",
    "AccountPlanOut",
    "AccountQuotaOut",
    "AssignmentIn",
    "AssignmentOut",
    "LimitOut",
    "PlanIn",
    "PlanVersionOut",
]

#: The largest version number the store's ``integer`` column holds.
MAX_VERSION = 2**31 - 1

_DateTime = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class PlanIn(PlanTerms):
    """A new plan version: POST /v1/plans. The store numbers it (1 for a new plan_id)."""

    name: DisplayName = ""

    @field_validator("limits")
    @classmethod
    def _storable(cls, limits: PlanLimits) -> PlanLimits:
        patterns = [
            *(limits.models_allowed or ()),
            *limits.models_refused,
            *limits.per_model,
        ]
        if any("\x00" in p for p in patterns):
            raise PydanticCustomError("nul", "Model names should not contain NUL characters")
        return limits


class AssignmentIn(BaseModel):
    """POST /v1/accounts/{account_id}/plan: the account is on this plan from then on."""

    model_config = ConfigDict(extra="forbid")

    plan_id: PlanId
    version: Annotated[int, Field(ge=1, le=MAX_VERSION)] | None = Field(
        None, description="Default: the plan's latest version."
    )
    effective_from: Instant | None = Field(
        None, description="Default: now. An assignment at the same instant is replaced."
    )


class PlanVersionOut(BaseModel):
    """One version of a plan; money as decimal strings, a limit that is null is not set."""

    plan_id: str
    version: int
    name: str
    limits: PlanLimits
    price_multiplier: str = Field(examples=["1.25"])
    request_fee_usd: str = Field(examples=["0.001"])
    billing: Literal["postpaid", "prepaid"]
    created_at: _DateTime | None

    @classmethod
    def of(cls, plan: PlanVersion) -> Self:
        return cls(
            plan_id=plan.plan_id,
            version=plan.version,
            name=plan.name,
            limits=plan.limits,
            price_multiplier=format_usd(plan.price_multiplier),
            request_fee_usd=format_usd(plan.request_fee_usd),
            billing=plan.billing,
            created_at=None if plan.created_at is None else plan.created_at.isoformat(),
        )


class AssignmentOut(BaseModel):
    account_id: str
    plan_id: str
    version: int
    effective_from: _DateTime
    assigned_at: _DateTime
    assigned_by: str = Field(description='"cli", or "api:<key id>" of the admin key.')

    @classmethod
    def of(cls, assignment: Assignment) -> Self:
        return cls(
            account_id=assignment.account_id,
            plan_id=assignment.plan_id,
            version=assignment.version,
            effective_from=assignment.effective_from.isoformat(),
            assigned_at=assignment.assigned_at.isoformat(),
            assigned_by=assignment.assigned_by,
        )


class AccountPlanOut(BaseModel):
    """The plan an account is on: the assignment in force and the version it names."""

    assignment: AssignmentOut
    plan: PlanVersionOut

    @classmethod
    def of(cls, assignment: Assignment, plan: PlanVersion) -> Self:
        return cls(assignment=AssignmentOut.of(assignment), plan=PlanVersionOut.of(plan))


class LimitOut(BaseModel):
    """One limit of the account, its API key or a model: counts of requests or tokens,
    or for spend limits decimal USD strings."""

    limit: str = Field(description='e.g. "requests_per_minute", "spend_per_month"')
    scope: str = Field(description='"account", "api_key:<id>" or "model:<pattern>"')
    used: str
    cap: str = Field(description="the plan's limit")
    remaining: str
    resets_at: _DateTime | None = Field(
        None,
        description="End of the calendar day or month, in the account's time zone; "
        "null for the rolling minute and requests in flight.",
    )

    @classmethod
    def of(cls, state: LimitState) -> Self:
        return cls(
            limit=state.limit,
            scope=state.scope,
            used=state.shown(state.used),
            cap=state.shown(state.cap),
            remaining=state.shown(state.remaining),
            resets_at=state.resets_at.isoformat() if state.resets_at else None,
        )


class AccountQuotaOut(BaseModel):
    """GET /v1/accounts/{account_id}/quota: every limit of the account's plan now."""

    account_id: str
    timezone: str = Field(description="The account's, in which its days and months run.")
    suspended: bool
    plan_id: str | None = Field(None, description="null: no plan, so no limit")
    plan_version: int | None = None
    limits: list[LimitOut]
