"""Who may call which route: every route of the API × every kind of key presented.

:data:`POLICY` is the policy, one line per route; :func:`expected` reads it
with :data:`READS` (which accounts each key reads). The app's routes are
enumerated, so a route added without a line here fails
:func:`test_every_route_has_a_policy`. Each cell of the matrix is a test of
its own, named ``<method> <route> @<account> as <key>``.

Accounts: A and B exist, C does not. A key that may not read an account
gets the same 403 for A and for C: nothing tells it whether C exists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import pytest
import redis.asyncio
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from prometheus_client import CollectorRegistry

from conftest import bearer, unique
from meterline.accounts import KeyKind, KeyRing
from meterline.accounts.keys import new_key
from meterline.accounts.manage import Accounts, IssuedKey
from meterline.alerts.controller import AlertBook
from meterline.alerts.model import AlertKind
from meterline.alerts.postgres import AlertStore
from meterline.credits.model import GrantKind
from meterline.credits.postgres import PostgresLedger
from meterline.lib.postgres import Database
from meterline.lib.settings import HttpSettings, QuotaSettings
from meterline.lib.warehouse import Warehouse
from meterline.quotas.desk import QuotaDesk
from meterline.quotas.plans import PlanTerms
from meterline.quotas.postgres import PostgresPlanStore
from services.api.app import create_app

Client = AsyncTestClient[Litestar]


class Policy(Enum):
    ADMIN = "admin keys only"
    READS_ACCOUNT = "keys that may read the path's account"
    ANY_KEY = "every valid key"


@dataclass(frozen=True)
class Route:
    policy: Policy
    #: what the route answers a key it lets through (for account A, if it has one)
    ok: int
    #: ... and for account C, which does not exist; None: no account in the path
    missing: int | None = None


POLICY: dict[tuple[str, str], Route] = {
    ("GET", "/v1/accounts/{account_id}/usage"): Route(Policy.READS_ACCOUNT, 200, missing=200),
    ("GET", "/v1/accounts/{account_id}"): Route(Policy.READS_ACCOUNT, 200, missing=404),
    ("PATCH", "/v1/accounts/{account_id}"): Route(Policy.ADMIN, 200, missing=404),
    ("GET", "/v1/accounts"): Route(Policy.ADMIN, 200),
    ("POST", "/v1/accounts"): Route(Policy.ADMIN, 201),
    ("GET", "/v1/keys"): Route(Policy.ADMIN, 200),
    ("POST", "/v1/keys"): Route(Policy.ADMIN, 201),
    ("POST", "/v1/keys/{key_id}/revoke"): Route(Policy.ADMIN, 200),
    ("GET", "/v1/catalog/prices"): Route(Policy.ANY_KEY, 200),
    ("GET", "/v1/catalog/versions"): Route(Policy.ANY_KEY, 200),
    ("POST", "/v1/catalog/prices"): Route(Policy.ADMIN, 201),
    ("GET", "/v1/plans"): Route(Policy.ADMIN, 200),
    ("POST", "/v1/plans"): Route(Policy.ADMIN, 201),
    ("GET", "/v1/plans/{plan_id}/versions"): Route(Policy.ADMIN, 200),
    ("POST", "/v1/accounts/{account_id}/plan"): Route(Policy.ADMIN, 201, missing=404),
    ("GET", "/v1/accounts/{account_id}/plan"): Route(Policy.READS_ACCOUNT, 200, missing=404),
    ("GET", "/v1/accounts/{account_id}/quota"): Route(Policy.READS_ACCOUNT, 200, missing=404),
    ("POST", "/v1/accounts/{account_id}/grants"): Route(Policy.ADMIN, 201, missing=404),
    ("POST", "/v1/accounts/{account_id}/grants/{grant_id}/void"): Route(
        Policy.ADMIN, 201, missing=404
    ),
    ("POST", "/v1/accounts/{account_id}/adjustments"): Route(Policy.ADMIN, 201, missing=404),
    ("GET", "/v1/accounts/{account_id}/balance"): Route(Policy.READS_ACCOUNT, 200, missing=404),
    ("GET", "/v1/accounts/{account_id}/ledger"): Route(Policy.READS_ACCOUNT, 200, missing=404),
    ("GET", "/v1/accounts/{account_id}/ledger/check"): Route(Policy.ADMIN, 200, missing=404),
    ("PUT", "/v1/accounts/{account_id}/alerts/webhook"): Route(Policy.ADMIN, 200, missing=404),
    ("DELETE", "/v1/accounts/{account_id}/alerts/webhook"): Route(Policy.ADMIN, 204, missing=404),
    ("POST", "/v1/accounts/{account_id}/alerts/rules"): Route(Policy.ADMIN, 201, missing=404),
    ("GET", "/v1/accounts/{account_id}/alerts/rules"): Route(
        Policy.READS_ACCOUNT, 200, missing=404
    ),
    ("DELETE", "/v1/accounts/{account_id}/alerts/rules/{rule_id}"): Route(
        Policy.ADMIN, 204, missing=404
    ),
    ("GET", "/v1/accounts/{account_id}/alerts"): Route(Policy.READS_ACCOUNT, 200, missing=404),
}
#: Routes anyone may call; so may OPTIONS (Litestar's answer: the methods, nothing else).
OPEN = {("GET", "/"), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics")}
OPEN_PREFIX = "/schema"  # the OpenAPI and its viewers

#: Who presents what; the first five are not valid keys now.
UNAUTHENTICATED = ("no key", "malformed", "unknown", "revoked", "expired")
PRESENTERS = (*UNAUTHENTICATED, "admin", "service", "service A", "account A", "account B")
#: The accounts each valid key may read.
READS = {
    "admin": {"A", "B", "C"},
    "service": {"A", "B", "C"},
    "service A": {"A"},
    "account A": {"A"},
    "account B": {"B"},
}
#: The 401's detail per presenter ({} is the key id).
UNAUTHENTICATED_DETAIL = {
    "no key": "no API key: send Authorization: Bearer <key>",
    "malformed": "not a valid API key",
    "unknown": "not a valid API key",
    "revoked": "API key {} is revoked",
    "expired": "API key {} is expired",
}


def expected(route: Route, account: str | None, presenter: str) -> int:
    if presenter in UNAUTHENTICATED:
        return 401
    if route.policy is Policy.ADMIN and presenter != "admin":
        return 403
    if route.policy is Policy.READS_ACCOUNT and account not in READS[presenter]:
        return 403
    return route.missing if account == "C" and route.missing is not None else route.ok


@dataclass(frozen=True)
class Cell:
    method: str
    path: str
    account: str | None
    presenter: str

    @property
    def route(self) -> Route:
        return POLICY[(self.method, self.path)]

    def __str__(self) -> str:
        where = f" @{self.account}" if self.account else ""
        return f"{self.method} {self.path}{where} as {self.presenter}"


def _cells() -> Iterator[Cell]:
    for method, path in POLICY:
        for account in ("A", "C") if "{account_id}" in path else (None,):
            for presenter in PRESENTERS:
                yield Cell(method, path, account, presenter)


CELLS = list(_cells())


@dataclass(frozen=True)
class Cast:
    """The accounts and keys of the matrix, and the app that knows them."""

    app: Litestar
    accounts: dict[str, str]
    #: presenter -> the Authorization header's value (None: no header)
    authorization: dict[str, str | None]
    key_ids: dict[str, str]
    #: a key the revoke route may revoke, again and again
    revocable: str
    #: a plan account A is on
    plan_id: str
    ledger: PostgresLedger
    alerts: AlertStore

    def grant_of(self, account: str | None) -> str:
        """A new grant of account A for the void route to release (C has none)."""
        if account != "A":
            return "gr_missing"
        grant, _ = self.ledger.grant(
            self.accounts["A"],
            amount_picos=10**12,
            kind=GrantKind.PURCHASED,
            idempotency_key=unique("matrix-grant"),
        )
        return grant.grant_id

    def rule_of(self, account: str | None) -> str:
        """A new alert rule of account A for the remove route to remove (C has none)."""
        if account != "A":
            return "alr_missing"
        rule = self.alerts.add_rule(self.accounts["A"], AlertKind.CREDITS_EXPIRING, within=DAY)
        return rule.rule_id

    def ready(self, cell: Cell) -> None:
        """What the cell's call removes, made first (for account A)."""
        if cell.account == "A" and (cell.method, cell.path) == WEBHOOK_REMOVAL:
            self.alerts.set_webhook(self.accounts["A"], "https://gateway.example/alerts")


@pytest.fixture(scope="module")
def cast(warehouse: Warehouse, accounts: Accounts, key_ring: KeyRing, database: Database) -> Cast:
    now = datetime.now(UTC)
    names = {"A": unique("matrix-a"), "B": unique("matrix-b"), "C": unique("matrix-absent")}
    accounts.store.create_account(names["A"])
    accounts.store.create_account(names["B"])
    issued: dict[str, IssuedKey] = {
        "revoked": accounts.issue_key(KeyKind.ADMIN, name="matrix revoked"),
        "expired": accounts.issue_key(KeyKind.ADMIN, expires_at=now + timedelta(hours=1)),
        "admin": accounts.issue_key(KeyKind.ADMIN, name="matrix admin"),
        "service": accounts.issue_key(KeyKind.SERVICE, name="matrix gateway"),
        "service A": accounts.issue_key(KeyKind.SERVICE, account_ids=[names["A"]]),
        "account A": accounts.issue_key(KeyKind.ACCOUNT, account_id=names["A"]),
        "account B": accounts.issue_key(KeyKind.ACCOUNT, account_id=names["B"]),
    }
    accounts.revoke_key(issued["revoked"].key.key_id)
    revocable = accounts.issue_key(KeyKind.SERVICE, name="matrix revocable").key.key_id
    plans = PostgresPlanStore(database)
    ledger = PostgresLedger(database)
    plan_id = plans.add_version(PlanTerms(plan_id=unique("matrix-plan"))).plan_id
    plans.assign(names["A"], plan_id, None, now, "matrix")
    # the API's own ring, two hours on: the key that expires in one has expired
    ring = KeyRing(key_ring.store, key_ring.hasher, clock=lambda: now + timedelta(hours=2))
    # The plan sets no limit, so the quota route answers without asking Redis (whose
    # client would be bound to one test's loop); the terms are read once, not refreshed
    # in the background of a test whose loop then closes.
    quotas = QuotaDesk(
        redis.asyncio.Redis.from_url("redis://127.0.0.1:6379/0"),
        key_prefix=f"test:{unique('matrix')}:",
        settings=QuotaSettings(),
        accounts=accounts.store,
        plans=plans,
        ledger=ledger,
        warehouse=warehouse,
        refresh_s=3600,
    )
    app = create_app(
        warehouse,
        auth=ring.load(),
        accounts=accounts,
        plans=plans,
        quotas=quotas,
        ledger=ledger,
        alerts=AlertBook(AlertStore(database), b"matrix-server-secret-0123456789"),
        registry=CollectorRegistry(),
    )
    authorization: dict[str, str | None] = {
        "no key": None,
        "malformed": "Bearer not-a-key",
        "unknown": f"Bearer {new_key()[1]}",
    }
    authorization |= {who: bearer(key)["Authorization"] for who, key in issued.items()}
    key_ids = {who: key.key.key_id for who, key in issued.items()}
    return Cast(
        app, names, authorization, key_ids, revocable, plan_id, ledger, AlertStore(database)
    )


@pytest.fixture
async def client(cast: Cast) -> AsyncIterator[Client]:
    async with AsyncTestClient(app=cast.app) as test_client:
        yield test_client


#: A request each route accepts from a key it lets through.
BODIES: dict[tuple[str, str], Callable[[Cast], Any]] = {
    ("PATCH", "/v1/accounts/{account_id}"): lambda _: {"name": "renamed by the matrix"},
    ("POST", "/v1/accounts"): lambda _: {"account_id": unique("matrix-new")},
    ("POST", "/v1/keys"): lambda cast: {"kind": "account", "account_id": cast.accounts["A"]},
    ("POST", "/v1/catalog/prices"): lambda _: {
        "model": "matrix-model",
        "provider": "matrix",
        "effective_from": "2026-01-01T00:00:00Z",
        "rates": {"input": "1", "output": "2"},
    },
    ("POST", "/v1/plans"): lambda cast: {"plan_id": cast.plan_id},
    ("POST", "/v1/accounts/{account_id}/plan"): lambda cast: {"plan_id": cast.plan_id},
    ("POST", "/v1/accounts/{account_id}/grants"): lambda _: {
        "amount_usd": "5.00",
        "idempotency_key": unique("matrix-topup"),
    },
    ("POST", "/v1/accounts/{account_id}/grants/{grant_id}/void"): lambda _: {
        "idempotency_key": unique("matrix-void"),
    },
    ("POST", "/v1/accounts/{account_id}/adjustments"): lambda _: {
        "amount_usd": "1.00",
        "reason": "matrix",
        "idempotency_key": unique("matrix-adjust"),
    },
    ("PUT", "/v1/accounts/{account_id}/alerts/webhook"): lambda _: {
        "url": "https://gateway.example/alerts"
    },
    ("POST", "/v1/accounts/{account_id}/alerts/rules"): lambda _: {
        "kind": "balance_below",
        "threshold_usd": "5",
    },
}
WEBHOOK_REMOVAL = ("DELETE", "/v1/accounts/{account_id}/alerts/webhook")
DAY = timedelta(days=1)
QUERIES = {("GET", "/v1/catalog/versions"): {"model": "gpt-4.1-mini"}}


async def call(client: Client, cast: Cast, cell: Cell) -> Any:
    url = cell.path.format(
        account_id=cast.accounts[cell.account] if cell.account else None,
        key_id=cast.revocable,
        plan_id=cast.plan_id,
        grant_id=cast.grant_of(cell.account) if "{grant_id}" in cell.path else None,
        rule_id=cast.rule_of(cell.account) if "{rule_id}" in cell.path else None,
    )
    cast.ready(cell)
    header = cast.authorization[cell.presenter]
    body = BODIES.get((cell.method, cell.path))
    return await client.request(
        cell.method,
        url,
        headers={} if header is None else {"Authorization": header},
        params=QUERIES.get((cell.method, cell.path)),
        json=None if body is None else body(cast),
    )


@pytest.mark.parametrize("cell", CELLS, ids=str)
async def test_the_matrix(client: Client, cast: Cast, cell: Cell) -> None:
    response = await call(client, cast, cell)
    want = expected(cell.route, cell.account, cell.presenter)
    assert response.status_code == want, f"{cell}: {response.status_code} {response.text}"
    if want == 401:
        key_id = cast.key_ids.get(cell.presenter, "")
        detail = UNAUTHENTICATED_DETAIL[cell.presenter].format(key_id)
        assert response.json() == {"status_code": 401, "detail": detail}, cell
        assert response.headers["www-authenticate"] == "Bearer", cell
    elif want == 403:
        assert set(response.json()) == {"status_code", "detail"}, cell


ACCOUNT_ROUTES = [route for route in POLICY if "{account_id}" in route[1]]


@pytest.mark.parametrize("route", ACCOUNT_ROUTES, ids=" ".join)
async def test_other_accounts_look_alike_existing_or_not(
    client: Client, cast: Cast, route: tuple[str, str]
) -> None:
    """Every 403 of a route with an account in its path is the same answer, byte for byte."""
    refused = [
        c
        for c in CELLS
        if (c.method, c.path) == route and expected(c.route, c.account, c.presenter) == 403
    ]
    scoped = [c for c in refused if c.presenter in ("service A", "account A", "account B")]
    assert {c.account for c in scoped} == {"A", "C"}  # an existing and an absent account
    answers = {str(c): (await call(client, cast, c)).content for c in refused}
    assert len(set(answers.values())) == 1, answers


async def test_every_route_has_a_policy(cast: Cast) -> None:
    routes = {
        (method, route.path_format)
        for route in cast.app.routes
        if isinstance(route, HTTPRoute)
        for handler in route.route_handlers
        for method in handler.http_methods
    }
    unlisted = {
        (method, path)
        for method, path in routes - POLICY.keys() - OPEN
        if method != "OPTIONS" and not path.startswith(OPEN_PREFIX)
    }
    assert not unlisted, f"routes without a line in POLICY: {sorted(unlisted)}"
    assert POLICY.keys() <= routes, f"lines for no route: {sorted(POLICY.keys() - routes)}"
    assert all(isinstance(route, HTTPRoute) for route in cast.app.routes)
    print(f"\n{len(CELLS)} cells: {len(POLICY)} routes × {len(PRESENTERS)} presenters")


async def test_open_routes_answer_without_a_key(client: Client, cast: Cast) -> None:
    open_paths = sorted(
        route.path_format.replace("{path}", "nothing-here")
        for route in cast.app.routes
        if route.path_format.startswith(OPEN_PREFIX) or ("GET", route.path_format) in OPEN
    )
    assert {"/", "/healthz", "/readyz", "/metrics", "/schema/openapi.json"} <= set(open_paths)
    for path in open_paths:
        response = await client.get(path)
        want = 404 if path.endswith("nothing-here") else 200
        assert response.status_code == want, (path, response.text)
    schema = (await client.get("/schema/openapi.json")).json()
    assert "/v1/keys" in schema["paths"]


async def test_options_answers_without_a_key_and_tells_nothing(client: Client, cast: Cast) -> None:
    for path in sorted({path for _, path in POLICY}):
        url = path.format(
            account_id=cast.accounts["C"], key_id="k", plan_id="p", grant_id="g", rule_id="r"
        )
        response = await client.options(url)
        assert response.status_code == 204, (url, response.text)
        # Litestar 2.25 lists only some of a route's methods: what matters is the empty body
        assert "OPTIONS" in response.headers["allow"] and response.content == b""


async def test_metrics_can_be_closed(
    warehouse: Warehouse, accounts: Accounts, key_ring: KeyRing
) -> None:
    closed = HttpSettings.model_validate({"metrics_public": False})
    app = create_app(warehouse, auth=key_ring, accounts=accounts, settings=closed)
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200


async def test_refused_requests_are_counted_with_their_status(
    warehouse: Warehouse, accounts: Accounts, key_ring: KeyRing
) -> None:
    app = create_app(warehouse, auth=key_ring, accounts=accounts, registry=CollectorRegistry())
    async with AsyncTestClient(app=app) as client:
        assert (await client.get("/v1/catalog/prices")).status_code == 401
        metrics = (await client.get("/metrics")).text
    labels = 'method="GET",route="/v1/catalog/prices",status="401"'
    assert f"meterline_http_requests_total{{{labels}}} 1.0" in metrics


async def test_the_openapi_declares_the_bearer_scheme(client: Client) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    scheme = schema["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for method, path in POLICY:
        operation = schema["paths"][path][method.lower()]
        assert operation["security"] == [{"bearer": []}], (method, path)
        for status in ("401", "403"):
            error = operation["responses"][status]["content"]["application/json"]["schema"]
            assert {"status_code", "detail"} <= set(error["properties"]), (method, path, status)
    for method, path in OPEN:
        assert "security" not in schema["paths"][path][method.lower()], path
