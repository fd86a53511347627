"""The alerts slice's HTTP routes: an account's rules and webhook (admin keys), its alerts
with every delivery attempt (whoever may read the account). The :class:`AlertBook` is
injected by name as ``alerts``; its blocking calls run in a worker thread."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post, put
from litestar.di import NamedDependency
from litestar.exceptions import NotFoundException, ValidationException
from litestar.params import FromPath, JSONBody, QueryParameter, SkipValidation
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from pydantic import BaseModel

from meterline.accounts.http import (
    ACCESS_ERRORS,
    KEY_REQUIRED,
    admin_only,
    path_account,
    principal_of,
    reads_account,
)
from meterline.alerts.model import webhook_secret
from meterline.alerts.postgres import AlertStore
from meterline.alerts.schemas import AlertOut, RuleIn, RuleOut, WebhookIn, WebhookOut

__all__ = ["AlertBook", "AlertsController"]

_ERRORS = [*ACCESS_ERRORS, ValidationException, NotFoundException]


@dataclass(frozen=True)
class AlertBook:
    """The alert store, and the server secret the signing secrets are derived from."""

    store: AlertStore
    server_secret: bytes

    def secret(self, account_id: str, generation: int) -> str:
        return webhook_secret(self.server_secret, account_id, generation)


AlertsDependency = NamedDependency[SkipValidation[AlertBook]]


class AlertsPage(BaseModel):
    alerts: list[AlertOut]
    #: the last alert_id of this page, for ``before``; null on the last page
    next: str | None


class AlertsController(Controller):
    path = "/v1/accounts/{account_id:str}/alerts"
    tags = ("alerts",)
    security = KEY_REQUIRED

    @put(
        "/webhook",
        summary="Post the account's alerts to a URL",
        guards=[admin_only],
        raises=_ERRORS,
    )
    async def set_webhook(
        self, alerts: AlertsDependency, account_id: FromPath[str], data: JSONBody[WebhookIn]
    ) -> WebhookOut:
        """The URL and its signing secret (a new URL, a new secret; the same URL again
        keeps it)."""
        url = str(data.url)
        generation = await asyncio.to_thread(
            alerts.store.set_webhook, path_account(account_id), url
        )
        return WebhookOut(url=url, signing_secret=alerts.secret(account_id, generation))

    @delete(
        "/webhook",
        summary="Stop posting the account's alerts",
        guards=[admin_only],
        raises=_ERRORS,
        status_code=HTTP_204_NO_CONTENT,
    )
    async def remove_webhook(self, alerts: AlertsDependency, account_id: FromPath[str]) -> None:
        if not await asyncio.to_thread(alerts.store.remove_webhook, path_account(account_id)):
            raise NotFoundException("the account has no webhook")

    @post(
        "/rules",
        summary="Add a threshold",
        guards=[admin_only],
        raises=_ERRORS,
        status_code=HTTP_201_CREATED,
    )
    async def add_rule(
        self,
        request: Request[Any, Any, Any],
        alerts: AlertsDependency,
        account_id: FromPath[str],
        data: JSONBody[RuleIn],
    ) -> RuleOut:
        rule = await asyncio.to_thread(
            lambda: alerts.store.add_rule(
                path_account(account_id),
                data.kind,
                threshold_picos=data.threshold_usd,
                within=data.within,
                share_percent=data.share_percent,
                calendar=data.calendar,
                created_by=f"api:{principal_of(request).key_id}",
            )
        )
        return RuleOut.of(rule)

    @get("/rules", summary="An account's thresholds", guards=[reads_account], raises=_ERRORS)
    async def rules(self, alerts: AlertsDependency, account_id: FromPath[str]) -> list[RuleOut]:
        await asyncio.to_thread(alerts.store.require, path_account(account_id))
        found = await asyncio.to_thread(alerts.store.rules, [account_id])
        return [RuleOut.of(r) for r in found.get(account_id, [])]

    @delete(
        "/rules/{rule_id:str}",
        summary="Remove a threshold",
        guards=[admin_only],
        raises=_ERRORS,
        status_code=HTTP_204_NO_CONTENT,
    )
    async def remove_rule(
        self, alerts: AlertsDependency, account_id: FromPath[str], rule_id: FromPath[str]
    ) -> None:
        await asyncio.to_thread(alerts.store.remove_rule, path_account(account_id), rule_id)

    @get(
        "/",
        summary="An account's alerts and their deliveries",
        guards=[reads_account],
        raises=_ERRORS,
    )
    async def alerts(
        self,
        alerts: AlertsDependency,
        account_id: FromPath[str],
        before: Annotated[str | None, QueryParameter(max_length=64)] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 50,
    ) -> AlertsPage:
        """Newest first, each delivery (webhook, kafka) with every attempt; ``before``:
        the ``next`` of the previous page."""
        await asyncio.to_thread(alerts.store.require, path_account(account_id))
        found = await asyncio.to_thread(
            lambda: alerts.store.alerts(account_id, before=before, limit=limit)
        )
        last = found[-1].alert_id if len(found) == limit else None
        return AlertsPage(alerts=[AlertOut.of(a) for a in found], next=last)
