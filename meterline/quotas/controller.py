"""The plans slice's HTTP routes: plan versions, and the plan each account is on.

Writing plans and assigning them is for admin keys; an account's plan is
for whoever may read the account
(:func:`~meterline.accounts.http.reads_account`). The
:class:`~meterline.quotas.store.PlanStore` is injected by name as ``plans``
and its blocking calls run in a worker thread. A missing plan
(``PlanNotFound``) or account is a 404, answered by the application's
exception handlers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ServiceUnavailableException, ValidationException
from litestar.params import FromPath, JSONBody, QueryParameter, SkipValidation
from litestar.status_codes import HTTP_201_CREATED
from pydantic import TypeAdapter, ValidationError

from meterline.accounts.http import (
    ACCESS_ERRORS,
    KEY_REQUIRED,
    admin_only,
    principal_of,
    reads_account,
)
from meterline.accounts.model import MAX_ACCOUNT_ID_LENGTH, AccountNotFound, account_id_problem
from meterline.catalog.schemas import instant_parameter
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.engine import NeedsRebuild
from meterline.quotas.plans import PlanId
from meterline.quotas.schemas import (
    AccountPlanOut,
    AccountQuotaOut,
    AssignmentIn,
    AssignmentOut,
    LimitOut,
    PlanIn,
    PlanVersionOut,
)
from meterline.quotas.store import PlanNotFound, PlanStore

__all__ = ["AccountPlanController", "AccountQuotaController", "PlanController"]

_ERRORS = [*ACCESS_ERRORS, ValidationException, NotFoundException, ServiceUnavailableException]

PlansDependency = NamedDependency[SkipValidation[PlanStore]]
QuotasDependency = NamedDependency[SkipValidation[QuotaDesk]]
_SCOPE_PARAMETER = QueryParameter(
    description="Also the limits of this scope (its API key's, its model's patterns').",
    max_length=256,
)
_PLAN_ID: TypeAdapter[str] = TypeAdapter(PlanId)


class PlanController(Controller):
    """Plan versions: add one, the latest of each plan, a plan's history."""

    path = "/v1/plans"
    tags = ("plans",)
    security = KEY_REQUIRED

    @post(
        "/",
        summary="Add a plan version",
        guards=[admin_only],
        status_code=HTTP_201_CREATED,
        raises=_ERRORS,
    )
    async def add_plan_version(
        self, plans: PlansDependency, data: JSONBody[PlanIn]
    ) -> PlanVersionOut:
        """The plan's next version (1 for a new ``plan_id``); accounts on an older
        version stay on it until they are assigned this one.

        ``{"plan_id": "pro", "limits": {"requests_per_minute": 600,
        "spend_per_month_usd": "500.00"}, "price_multiplier": "1.25"}``: money is
        decimal strings.
        """
        made = await asyncio.to_thread(plans.add_version, data)
        return PlanVersionOut.of(made)

    @get("/", summary="The latest version of each plan", guards=[admin_only], raises=_ERRORS)
    async def list_plans(self, plans: PlansDependency) -> list[PlanVersionOut]:
        """In plan_id order."""
        latest = await asyncio.to_thread(plans.plans)
        return [PlanVersionOut.of(p) for p in latest]

    @get(
        "/{plan_id:str}/versions",
        summary="Every version of a plan",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def plan_versions(
        self, plans: PlansDependency, plan_id: FromPath[str]
    ) -> list[PlanVersionOut]:
        """Oldest first."""
        versions = await asyncio.to_thread(plans.versions, _path_plan_id(plan_id))
        return [PlanVersionOut.of(v) for v in versions]


class AccountPlanController(Controller):
    """The plan an account is on: assign one (now or from an instant), read the one in force."""

    path = "/v1/accounts/{account_id:str}/plan"
    tags = ("plans",)
    security = KEY_REQUIRED

    @post(
        "/",
        summary="Put an account on a plan",
        guards=[admin_only],
        status_code=HTTP_201_CREATED,
        raises=_ERRORS,
    )
    async def assign_plan(
        self,
        request: Request[Any, Any, Any],
        plans: PlansDependency,
        account_id: FromPath[str],
        data: JSONBody[AssignmentIn],
    ) -> AssignmentOut:
        """From ``effective_from`` (default now) until the account's next assignment;
        ``version`` defaults to the plan's latest. A future ``effective_from``
        schedules a change; the same instant again replaces that assignment."""
        who = f"api:{principal_of(request).key_id}"
        assigned = await asyncio.to_thread(
            plans.assign,
            _path_account_id(account_id),
            data.plan_id,
            data.version,
            data.effective_from or datetime.now(UTC),
            who,
        )
        return AssignmentOut.of(assigned)

    @get("/", summary="The plan an account is on", guards=[reads_account], raises=_ERRORS)
    async def account_plan(
        self,
        plans: PlansDependency,
        account_id: FromPath[str],
        at: Annotated[
            str | None,
            QueryParameter(
                description="Instant, ISO 8601 (default: now).", format="date-time", max_length=64
            ),
        ] = None,
    ) -> AccountPlanOut:
        """The assignment in force at ``at`` and the plan version it names; 404 when
        the account has none then."""
        moment = datetime.now(UTC) if at is None else instant_parameter("at", at)
        found = await asyncio.to_thread(plans.plan_of, _path_account_id(account_id), moment)
        if found is None:
            raise NotFoundException(f"no plan assigned to account {account_id!r}")
        return AccountPlanOut.of(*found)


class AccountQuotaController(Controller):
    """What an account has used of each limit of its plan, and what remains."""

    path = "/v1/accounts/{account_id:str}/quota"
    tags = ("plans",)
    security = KEY_REQUIRED

    @get(
        "/",
        summary="An account's limits: used, remaining, resets",
        guards=[reads_account],
        raises=_ERRORS,
    )
    async def account_quota(
        self,
        quotas: QuotasDependency,
        account_id: FromPath[str],
        api_key_id: Annotated[str | None, _SCOPE_PARAMETER] = None,
        model: Annotated[str | None, _SCOPE_PARAMETER] = None,
    ) -> AccountQuotaOut:
        """Per limit of the plan in force now: used (reservations of requests in flight
        included), the cap, what remains and when its calendar window resets. Counters
        Redis does not hold are rebuilt from the warehouse first. 503 when Redis does
        not answer."""
        from redis.exceptions import RedisError

        try:
            terms, plan, states = await quotas.usage(
                _path_account_id(account_id), api_key_id=api_key_id or None, model=model or None
            )
        except RedisError as exc:
            raise ServiceUnavailableException(f"Redis did not answer: {exc}") from exc
        except NeedsRebuild as exc:  # rebuilt, and gone again: Redis is losing keys
            raise ServiceUnavailableException(
                f"the account's counters are not in Redis ({exc}); retry"
            ) from exc
        if not terms.exists:
            raise AccountNotFound(f"no account {account_id!r}")
        return AccountQuotaOut(
            account_id=account_id,
            timezone=terms.timezone,
            suspended=terms.suspended,
            plan_id=None if plan is None else plan.plan_id,
            plan_version=None if plan is None else plan.version,
            limits=[LimitOut.of(s) for s in states],
        )


def _path_account_id(account_id: str) -> str:
    """An id no account can have is not found, rather than sent to the store."""
    if account_id_problem(account_id) is not None:
        raise AccountNotFound(f"no account {account_id[:MAX_ACCOUNT_ID_LENGTH]!r}")
    return account_id


def _path_plan_id(plan_id: str) -> str:
    """Likewise a plan id that breaks the rule plans are made by."""
    try:
        return _PLAN_ID.validate_python(plan_id)
    except ValidationError:
        raise PlanNotFound(f"no plan {plan_id[:128]!r}") from None
