"""The credits slice's HTTP routes: grants, adjustments and voids (admin keys), the
balance and the ledger (whoever may read the account), the check against the warehouse
(admin). The :class:`~meterline.credits.postgres.PostgresLedger` is injected by name as
``ledger``; its blocking calls run in a worker thread. An idempotency key used before
answers 200 with what it posted; used for something else, 409.

The gate of requests (``credit_gate``, the quota desk, when the API checks quotas)
keeps a copy of each prepaid account's credits in Redis: a grant, void or adjustment
writes the new credits there before it answers, so a top-up lets the next request
through. Redis not answering does not fail the posting: the copy is then read from
the ledger again within ``CREDIT_REFRESH_S``."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import FromPath, JSONBody, QueryParameter, SkipValidation
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from pydantic import BaseModel
from redis.exceptions import RedisError

from meterline.accounts.http import (
    ACCESS_ERRORS,
    KEY_REQUIRED,
    admin_only,
    path_account,
    principal_of,
    reads_account,
)
from meterline.catalog.schemas import instant_parameter
from meterline.credits.check import check_ledger
from meterline.credits.model import EntryKind
from meterline.credits.postgres import PostgresLedger
from meterline.credits.schemas import (
    AdjustmentIn,
    BalanceOut,
    EntryOut,
    GrantIn,
    GrantOut,
    VoidIn,
)
from meterline.lib.warehouse import Warehouse
from meterline.money import format_usd
from meterline.quotas.store import PlanStore
from meterline.usage.report import month_start

__all__ = ["CreditGate", "CreditsController"]

log = logging.getLogger(__name__)


class CreditGate(Protocol):
    """What gates requests on credits (:class:`~meterline.quotas.desk.QuotaDesk`)."""

    async def refresh_credits(self, account_id: str) -> None:
        """Write the account's credits, as the ledger says them now, where checks read."""
        ...

    async def credit_holds(self, account_id: str) -> int:
        """What the account's requests in flight hold of its credits (pico-dollars)."""
        ...


_ERRORS = [*ACCESS_ERRORS, ValidationException, NotFoundException]

LedgerDependency = NamedDependency[SkipValidation[PostgresLedger]]
WarehouseDependency = NamedDependency[SkipValidation[Warehouse]]
PlansDependency = NamedDependency[SkipValidation[PlanStore]]
GateDependency = NamedDependency[SkipValidation[CreditGate | None]]
_From = Annotated[
    str | None,
    QueryParameter(
        name="from", description="ISO 8601, inclusive.", format="date-time", max_length=64
    ),
]
_To = Annotated[
    str | None,
    QueryParameter(
        name="to", description="ISO 8601, exclusive.", format="date-time", max_length=64
    ),
]


class LedgerPage(BaseModel):
    entries: list[EntryOut]
    #: the last entry_id of this page, for ``after``; null on the last page
    next: int | None


class LedgerCheckOut(BaseModel):
    account_id: str
    start: str
    end: str
    agrees: bool
    ledger_events: int
    ledger_usd: str
    warehouse_events: int
    warehouse_usd: str
    missing: list[str]
    extra: list[str]
    differing: list[str]


def _who(request: Request[Any, Any, Any]) -> str:
    return f"api:{principal_of(request).key_id}"


def _answer(body: BaseModel, made: bool) -> Response[Any]:
    return Response(body, status_code=HTTP_201_CREATED if made else HTTP_200_OK)


async def _refresh(gate: CreditGate | None, account_id: str) -> None:
    """The account's credits, as just posted, to the gate of its requests."""
    if gate is None:
        return
    try:
        await gate.refresh_credits(account_id)
    except (RedisError, OSError) as exc:
        log.warning(
            "credits: %s posted, but Redis did not take its credits (%s); checks see them "
            "when they are read from the ledger again",
            account_id,
            exc,
        )


class CreditsController(Controller):
    path = "/v1/accounts/{account_id:str}"
    tags = ("credits",)
    security = KEY_REQUIRED

    @post("/grants", summary="Give an account credits", guards=[admin_only], raises=_ERRORS)
    async def grant(
        self,
        request: Request[Any, Any, Any],
        ledger: LedgerDependency,
        credit_gate: GateDependency,
        account_id: FromPath[str],
        data: JSONBody[GrantIn],
    ) -> Response[Any]:
        """201 with the grant; 200 with the same grant when its idempotency key was used
        before (409 if for other terms). Credits first pay what usage owes."""
        grant, made = await asyncio.to_thread(
            lambda: ledger.grant(
                path_account(account_id),
                amount_picos=data.amount_usd,
                kind=data.kind,
                priority=data.priority,
                effective_at=data.effective_at,
                expires_at=data.expires_at,
                idempotency_key=data.idempotency_key,
                created_by=_who(request),
            )
        )
        await _refresh(credit_gate, account_id)
        return _answer(GrantOut.of(grant), made)

    @post(
        "/grants/{grant_id:str}/void",
        summary="Release what is left of a grant",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def void(
        self,
        request: Request[Any, Any, Any],
        ledger: LedgerDependency,
        credit_gate: GateDependency,
        account_id: FromPath[str],
        grant_id: FromPath[str],
        data: JSONBody[VoidIn],
    ) -> Response[Any]:
        entry, made = await asyncio.to_thread(
            lambda: ledger.void(
                path_account(account_id),
                grant_id,
                idempotency_key=data.idempotency_key,
                reason=data.reason,
                created_by=_who(request),
            )
        )
        await _refresh(credit_gate, account_id)
        return _answer(EntryOut.of(entry), made)

    @post(
        "/adjustments",
        summary="Credit or debit an account, with a reason",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def adjust(
        self,
        request: Request[Any, Any, Any],
        ledger: LedgerDependency,
        credit_gate: GateDependency,
        account_id: FromPath[str],
        data: JSONBody[AdjustmentIn],
    ) -> Response[Any]:
        entry, made = await asyncio.to_thread(
            lambda: ledger.adjust(
                path_account(account_id),
                amount_picos=data.amount_usd,
                reason=data.reason,
                idempotency_key=data.idempotency_key,
                created_by=_who(request),
            )
        )
        await _refresh(credit_gate, account_id)
        return _answer(EntryOut.of(entry), made)

    @get("/balance", summary="An account's credits now", guards=[reads_account], raises=_ERRORS)
    async def balance(
        self, ledger: LedgerDependency, credit_gate: GateDependency, account_id: FromPath[str]
    ) -> BalanceOut:
        """The balance (the sum of its entries), what it may spend now, what requests in
        flight hold of it, what usage owes beyond its grants, and its open grants in the
        order they are spent."""
        found = await asyncio.to_thread(ledger.balance, path_account(account_id))
        held: int | None = 0
        if credit_gate is not None:
            try:
                held = await credit_gate.credit_holds(account_id)
            except (RedisError, OSError):
                held = None  # unknown: Redis keeps them
        return BalanceOut.of(found, reserved_picos=held)

    @get("/ledger", summary="An account's ledger entries", guards=[reads_account], raises=_ERRORS)
    async def ledger_entries(
        self,
        ledger: LedgerDependency,
        account_id: FromPath[str],
        kind: Annotated[
            list[EntryKind] | None, QueryParameter(description="Only these kinds (repeat).")
        ] = None,
        start: _From = None,
        end: _To = None,
        after: Annotated[int | None, QueryParameter(ge=0)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> LedgerPage:
        """In posting order; ``from``/``to`` bound when entries took effect."""
        entries = await asyncio.to_thread(
            lambda: ledger.entries(
                path_account(account_id),
                after=after,
                limit=limit,
                kinds=kind or (),
                start=None if start is None else instant_parameter("from", start),
                end=None if end is None else instant_parameter("to", end),
            )
        )
        last = entries[-1].entry_id if len(entries) == limit else None
        return LedgerPage(entries=[EntryOut.of(e) for e in entries], next=last)

    @get(
        "/ledger/check",
        summary="Does the ledger agree with the warehouse?",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def check(
        self,
        ledger: LedgerDependency,
        warehouse: WarehouseDependency,
        plans: PlansDependency,
        account_id: FromPath[str],
        start: _From = None,
        end: _To = None,
    ) -> LedgerCheckOut:
        """Usage debited against the ``charge_usd`` of the account's events priced under
        a prepaid plan, in [from, to) (default: this month), and the events that differ."""
        now = datetime.now(UTC)
        begin = month_start(now) if start is None else instant_parameter("from", start)
        until = now if end is None else instant_parameter("to", end)
        await asyncio.to_thread(ledger.require, path_account(account_id))
        found = await asyncio.to_thread(
            check_ledger, ledger, warehouse, plans, account_id, begin, until
        )
        return LedgerCheckOut(
            account_id=found.account_id,
            start=found.start.isoformat(),
            end=found.end.isoformat(),
            agrees=found.agrees,
            ledger_events=found.ledger_events,
            ledger_usd=format_usd(found.ledger_picos),
            warehouse_events=found.warehouse_events,
            warehouse_usd=format_usd(found.warehouse_picos),
            missing=found.missing,
            extra=found.extra,
            differing=found.differing,
        )
