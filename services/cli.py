"""The ``meterline`` command: one subcommand per service and pipeline."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from meterline.accounts import Account, AccountExists, AccountNotFound, ApiKey, KeyNotFound
from meterline.accounts.manage import Accounts
from meterline.catalog import PriceBook
from meterline.lib.logging import configure_logging
from meterline.lib.settings import IngestSettings, LogSettings, Settings
from meterline.quotas.plans import PlanVersion
from meterline.quotas.store import PlanNotFound, PlanStore

if TYPE_CHECKING:
    from meterline.credits.postgres import PostgresLedger
    from meterline.lib.postgres import Database


def _run_service(main: Callable[[Settings, asyncio.Event], Coroutine[Any, Any, None]]) -> int:
    from services.up import stop_on_signals

    settings = Settings()

    async def run() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await main(settings, stop)

    asyncio.run(run())
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.up import up

    return _run_service(up)


def cmd_ingest(args: argparse.Namespace) -> int:
    from services.up import ingest_only

    return _run_service(ingest_only)


def cmd_pipeline(args: argparse.Namespace) -> int:
    from services.up import pipeline_only

    return _run_service(pipeline_only)


def cmd_api(args: argparse.Namespace) -> int:
    from services.up import api_only

    return _run_service(api_only)


def _key(given: str | None, kind: str = "service") -> str | None:
    """--key, else METERLINE_KEY, else the ``kind`` key ``meterline up`` made in data_dir
    (the service key for a gateway, the admin key for reading accounts)."""
    if given or os.environ.get("METERLINE_KEY"):
        return given or os.environ["METERLINE_KEY"]
    path = Settings().data_dir / "keys.json"
    try:
        return str(json.loads(path.read_text())[f"{kind}_key"])
    except (OSError, ValueError, KeyError):
        return None


def cmd_simulate(args: argparse.Namespace) -> int:
    from services.simulate import simulate

    key = _key(args.key)
    if key is None:
        print(
            "meterline simulate: no API key: pass --key or set METERLINE_KEY "
            "(meterline up writes a service key to <data dir>/keys.json)",
            file=sys.stderr,
        )
    quota_target = None
    if args.check_quota or args.quota_target:
        from meterline.lib.settings import QuotaSettings

        quota_target = args.quota_target or f"127.0.0.1:{QuotaSettings().port}"
    target = args.target or f"127.0.0.1:{IngestSettings().port}"
    totals = asyncio.run(
        simulate(
            target,
            rate=args.rate,
            duration_s=args.duration,
            accounts=args.accounts,
            batch_size=args.batch,
            seed=args.seed,
            key=key,
            quota_target=quota_target,
            run_tag=args.run_tag,
        )
    )
    if totals.error:
        print(f"meterline simulate: {totals.error}", file=sys.stderr)
        return 1
    # every request denied is the plans' answer, not a broken setup
    return 0 if totals.accepted or totals.denied else 1


def _api_url(given: str | None) -> str:
    """--api, else this machine's address of the configured HTTP API."""
    if given:
        return given.rstrip("/")
    from meterline.lib.settings import HttpSettings

    http = HttpSettings()
    host = "127.0.0.1" if http.host in ("", "0.0.0.0", "::") else http.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{http.port}"


def _api_get(base: str, path: str, key: str | None, params: dict[str, str]) -> Any:
    """GET ``path`` of the HTTP API as JSON; its errors as the CLI's (a 404 naming an
    account is :class:`AccountNotFound`, exit 1; any other error, exit 1 with the API's
    detail)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    headers = {"Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{base}{path}{query}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = str(json.loads(exc.read())["detail"])
        except (ValueError, KeyError, TypeError):
            detail = exc.reason
        if exc.code == 404 and detail.startswith("no account"):
            raise AccountNotFound(detail) from None
        hint = " (pass --key, or set METERLINE_KEY)" if exc.code in (401, 403) else ""
        raise RuntimeError(f"the HTTP API at {base} answered {exc.code}: {detail}{hint}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise OSError(
            f"cannot reach the HTTP API at {base} ({reason}): is `meterline up` "
            "(or `meterline api`) running? --api names another address"
        ) from None


def _resets(limit: dict[str, Any], zone: tzinfo) -> str:
    """When a limit's window ends, in the account's time zone (its midnight reads as one)."""
    if limit["resets_at"] is not None:
        return datetime.fromisoformat(limit["resets_at"]).astimezone(zone).isoformat()
    return "rolling 60 s" if limit["limit"].endswith("_per_minute") else "-"


def cmd_quota(args: argparse.Namespace) -> int:
    """Through the HTTP API: the counters are in Redis and rebuilt from the warehouse,
    whose embedded chDB only the running server may open."""
    from urllib.parse import quote
    from zoneinfo import ZoneInfo

    base = _api_url(args.api)
    params = {
        name: value
        for name, value in (("api_key_id", args.api_key_id), ("model", args.model))
        if value
    }
    quota = _api_get(
        base,
        f"/v1/accounts/{quote(args.account_id, safe='')}/quota",
        _key(args.key, "admin"),
        params,
    )
    zone = ZoneInfo(quota["timezone"])
    state = " (suspended: every request is denied)" if quota["suspended"] else ""
    if quota["plan_id"] is None:
        print(f"account {quota['account_id']} ({quota['timezone']}){state} has no plan: no limits")
        return 0
    print(
        f"account {quota['account_id']} ({quota['timezone']}){state} on plan "
        f"{quota['plan_id']} version {quota['plan_version']}; spend in USD"
    )
    print(f"{'limit':<20} {'scope':<24} {'used':>12} {'cap':>12} {'remaining':>12}  resets at")
    for limit in quota["limits"]:
        print(
            f"{limit['limit']:<20} {limit['scope']:<24} {limit['used']:>12} {limit['cap']:>12} "
            f"{limit['remaining']:>12}  {_resets(limit, zone)}"
        )
    return 0


def _price_book() -> PriceBook:
    """The catalog in the configured warehouse, seeded on first use like `up` does."""
    from meterline.lib.warehouse import open_warehouse

    book = PriceBook(open_warehouse(Settings()))
    book.seed_if_empty()
    return book


def _rate(rate: Decimal | None) -> str:
    """A rate as listed; one not given costs the input rate."""
    from meterline.money import format_usd

    return "=input" if rate is None else format_usd(rate)


def cmd_catalog_list(args: argparse.Namespace) -> int:
    from meterline.money import format_usd

    catalog = _price_book().load()
    versions = catalog.versions if args.all else catalog.current()
    rows = [
        (v.model, v.provider, v.effective_from.date().isoformat(), v.rates, v.price_id, v.source)
        for v in versions
        if not args.model or args.model.lower() in v.model.lower()
    ]
    print(
        f"{'model':<28} {'provider':<10} {'from':<10} {'input':>8} {'cached':>8} "
        f"{'output':>8}  {'price_id':<19} source"
    )
    for model, provider, start, rates, price_id, source in rows:
        print(
            f"{model:<28} {provider:<10} {start:<10} {format_usd(rates.input):>8} "
            f"{_rate(rates.cache_read):>8} {format_usd(rates.output):>8}  {price_id:<19} "
            f"{source}"
        )
    print(f"{len(rows)} price versions; rates in USD per million tokens")
    return 0


def cmd_catalog_add(args: argparse.Namespace) -> int:
    from meterline.catalog import parse_price

    data = (
        json.loads(args.json)
        if args.json
        else {
            "model": args.model,
            "provider": args.provider,
            "effective_from": args.effective_from,
            "rates": {
                k: v
                for k, v in {
                    "input": args.input,
                    "output": args.output,
                    "cache_read": args.cache_read,
                    "cache_write_5m": args.cache_write_5m,
                    "cache_write_1h": args.cache_write_1h,
                    "reasoning": args.reasoning,
                    "request": args.request_fee,
                }.items()
                if v is not None
            },
        }
    )
    try:
        version = parse_price(data, source="cli")
    except ValueError as exc:
        print(f"meterline: invalid price: {exc}", file=sys.stderr)
        return 2
    added = _price_book().add([version])
    print(
        f"{'added' if added else 'already present'}: {version.price_id} "
        f"{version.model}/{version.provider} from {version.effective_from.isoformat()}"
    )
    return 0


def cmd_catalog_import(args: argparse.Namespace) -> int:
    from meterline.catalog.genai_import import import_prices

    try:
        result = import_prices(providers=args.provider or None)
    except ValueError as exc:
        print(f"meterline: {exc}", file=sys.stderr)
        return 2
    added = _price_book().add(result.versions)
    print(f"genai-prices: {len(result.versions)} price versions read, {len(added)} new")
    for what, counts in (("skipped", result.skipped), ("left out", result.dropped)):
        if counts:
            listed = ", ".join(f"{reason} ({n})" for reason, n in counts.most_common())
            print(f"  {what}: {listed}")
    return 0


def _moment(text: str) -> datetime:
    """An ISO 8601 instant; without an offset, UTC."""
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_reprice(args: argparse.Namespace) -> int:
    from meterline.lib.warehouse import open_warehouse
    from meterline.quotas.charges import ChargeBook
    from meterline.quotas.postgres import PostgresPlanStore
    from pipelines.repricing.job import reprice_unpriced

    settings = Settings()
    with contextlib.ExitStack() as stack:
        if settings.embedded_postgres and not settings.clickhouse.url:
            # The embedded chDB is this process's only while `meterline up` is stopped, and
            # so is the embedded PostgreSQL: start it for the run.
            from meterline.lib.postgres.embedded import EmbeddedPostgres

            stack.enter_context(
                EmbeddedPostgres(
                    settings.data_dir / "postgres",
                    settings.postgres.embedded_port,
                    log_path=settings.data_dir / "postgres.log",
                )
            )
        database = stack.enter_context(_database(settings))
        result = reprice_unpriced(  # charged by the plans in force, as the pipeline charges
            open_warehouse(settings),
            _moment(args.start),
            _moment(args.end),
            args.account or (),
            plans=ChargeBook(PostgresPlanStore(database)),
        )
    print(
        f"repricing run {result.run_id}: {result.examined} unpriced events examined, "
        f"{result.repriced} priced, ${result.cost_added_usd} added "
        f"(${result.charge_added_usd} charged)"
    )
    return 0


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Database]:
    """The configured PostgreSQL, migrated (embedded: that of a running ``meterline up``)."""
    from meterline.lib.postgres import PostgresError, open_database

    try:
        database = open_database(settings.postgres_url, settings.postgres)
    except PostgresError as exc:
        hint = " (is `meterline up` running?)" if settings.embedded_postgres else ""
        raise PostgresError(f"{exc}{hint}") from exc
    with database:
        yield database


@contextlib.contextmanager
def _accounts() -> Iterator[Accounts]:
    """The account store, with keys hashed under this installation's server secret."""
    from meterline.accounts.auth import SecretMismatch
    from meterline.accounts.keys import KeyHasher, server_secret
    from meterline.accounts.postgres import PostgresAccountStore

    settings = Settings()
    with _database(settings) as database:
        store = PostgresAccountStore(database)
        hasher = KeyHasher(
            server_secret(settings.keys.secret.get_secret_value(), settings.data_dir)
        )
        if not store.check_secret(hasher.secret_check()):
            raise SecretMismatch(
                "the API keys were made under another server secret: set "
                "METERLINE_KEYS_SECRET (or METERLINE_DATA_DIR) as the servers have it"
            )
        yield Accounts(store, hasher)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def _account_json(account: Account) -> dict[str, object]:
    return {**dataclasses.asdict(account), "metadata": dict(account.metadata)}


def _key_json(key: ApiKey) -> dict[str, object]:
    scope = None if key.account_ids is None else sorted(key.account_ids)
    return {
        **dataclasses.asdict(key),
        "account_ids": scope,
        "state": key.state(datetime.now(UTC)),
    }


def _metadata(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("--metadata is a JSON object")
    return value


def cmd_accounts_create(args: argparse.Namespace) -> int:
    from meterline.accounts.model import account_id_problem, check_timezone

    if problem := account_id_problem(args.account_id):
        raise ValueError(problem)
    with _accounts() as accounts:
        account = accounts.store.create_account(
            args.account_id,
            name=args.name or "",
            timezone=check_timezone(args.timezone),
            metadata=_metadata(args.metadata),
            registered_by="cli",
        )
    _print_json(_account_json(account))
    return 0


def cmd_accounts_show(args: argparse.Namespace) -> int:
    with _accounts() as accounts:
        _print_json(_account_json(accounts.store.account(args.account_id)))
    return 0


def cmd_accounts_list(args: argparse.Namespace) -> int:
    with _accounts() as accounts:
        page = accounts.store.accounts(after=args.after, limit=args.limit)
    print(f"{'account':<32} {'status':<10} {'timezone':<20} {'registered by':<13} name")
    for a in page:
        print(f"{a.account_id:<32} {a.status:<10} {a.timezone:<20} {a.registered_by:<13} {a.name}")
    if len(page) == args.limit:
        print(f"more: --after {page[-1].account_id}")
    return 0


def cmd_accounts_update(args: argparse.Namespace) -> int:
    from meterline.accounts import AccountStatus, AccountUpdate
    from meterline.accounts.model import check_timezone

    status = {"suspend": AccountStatus.SUSPENDED, "reactivate": AccountStatus.ACTIVE}.get(
        args.accounts_command
    )
    change = AccountUpdate(
        name=getattr(args, "name", None),
        status=status,
        timezone=check_timezone(args.timezone) if getattr(args, "timezone", None) else None,
        metadata=_metadata(getattr(args, "metadata", None)),
    )
    with _accounts() as accounts:
        _print_json(_account_json(accounts.store.update_account(args.account_id, change)))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from meterline.accounts import KeyKind

    expires = _moment(args.expires) if args.expires else None
    with _accounts() as accounts:
        issued = accounts.issue_key(
            KeyKind(args.kind),
            name=args.name or "",
            account_id=args.account,
            account_ids=args.scope,
            expires_at=expires,
        )
    _print_json({**_key_json(issued.key), "key": issued.secret})
    print("the key is shown this once: only its hash is kept", file=sys.stderr)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _accounts() as accounts:
        keys = accounts.store.api_keys(account_id=args.account)
    print(f"{'key id':<13} {'kind':<8} {'state':<8} {'scope':<24} {'last used':<20} name")
    for k in keys:
        scope = k.account_id or (
            "all accounts" if k.account_ids is None else ",".join(sorted(k.account_ids))
        )
        used = k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "never"
        print(
            f"{k.key_id:<13} {k.kind:<8} {k.state(datetime.now(UTC)):<8} {scope[:24]:<24} "
            f"{used:<20} {k.name}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    with _accounts() as accounts:
        _print_json(_key_json(accounts.revoke_key(args.key_id)))
    return 0


@contextlib.contextmanager
def _plans() -> Iterator[PlanStore]:
    """The plan store of the configured PostgreSQL."""
    from meterline.quotas.postgres import PostgresPlanStore

    with _database(Settings()) as database:
        yield PostgresPlanStore(database)


_Model = TypeVar("_Model", bound=BaseModel)


@contextlib.contextmanager
def _ledger() -> Iterator[PostgresLedger]:
    """The credits ledger of the configured PostgreSQL."""
    from meterline.credits.postgres import PostgresLedger

    with _database(Settings()) as database:
        yield PostgresLedger(database)


def _credits_to_gate(ledger: PostgresLedger, account_id: str) -> None:
    """The account's credits as just posted, to the Redis where quota checks read them;
    a Redis that does not answer is told of (checks read the ledger again within
    ``CREDIT_REFRESH_S``)."""
    import redis.asyncio
    from redis.exceptions import RedisError

    from meterline.quotas.engine import CREDIT_REFRESH_S, QuotaEngine

    settings = Settings()
    state = ledger.credit(account_id)

    async def publish() -> None:
        client = redis.asyncio.Redis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        try:
            engine = QuotaEngine(
                client, key_prefix=settings.redis.key_prefix, settings=settings.quota
            )
            await engine.publish_credits([state])
        finally:
            await client.aclose()

    try:
        asyncio.run(publish())
    except (RedisError, OSError) as exc:
        print(
            f"meterline: posted, but Redis ({settings.redis_url}) did not take the new "
            f"credits ({exc}); quota checks see them within {CREDIT_REFRESH_S:.0f} s",
            file=sys.stderr,
        )


def _body(schema: type[_Model], what: str, fields: dict[str, object]) -> _Model:
    """The CLI's arguments through the API's own body schema: the same rules and names."""
    try:
        return schema.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise _invalid(what, exc, what) from None


def cmd_credits_grant(args: argparse.Namespace) -> int:
    from meterline.credits.schemas import GrantIn, GrantOut

    body = _body(
        GrantIn,
        "grant",
        {
            "amount_usd": args.amount_usd,
            "kind": args.kind,
            "priority": args.priority,
            "effective_at": args.effective_at,
            "expires_at": args.expires_at,
            "idempotency_key": args.idempotency_key,
        },
    )
    with _ledger() as ledger:
        grant, made = ledger.grant(
            args.account_id,
            amount_picos=body.amount_usd,
            kind=body.kind,
            priority=body.priority,
            effective_at=body.effective_at,
            expires_at=body.expires_at,
            idempotency_key=body.idempotency_key,
            created_by="cli",
        )
        _credits_to_gate(ledger, args.account_id)
    _print_json({**GrantOut.of(grant).model_dump(mode="json"), "created": made})
    return 0


def cmd_credits_adjust(args: argparse.Namespace) -> int:
    from meterline.credits.schemas import AdjustmentIn, EntryOut

    body = _body(
        AdjustmentIn,
        "adjustment",
        {
            "amount_usd": args.amount_usd,
            "reason": args.reason,
            "idempotency_key": args.idempotency_key,
        },
    )
    with _ledger() as ledger:
        entry, made = ledger.adjust(
            args.account_id,
            amount_picos=body.amount_usd,
            reason=body.reason,
            idempotency_key=body.idempotency_key,
            created_by="cli",
        )
        _credits_to_gate(ledger, args.account_id)
    _print_json({**EntryOut.of(entry).model_dump(mode="json"), "created": made})
    return 0


def cmd_credits_void(args: argparse.Namespace) -> int:
    from meterline.credits.schemas import EntryOut, VoidIn

    body = _body(VoidIn, "void", {"idempotency_key": args.idempotency_key, "reason": args.reason})
    with _ledger() as ledger:
        entry, made = ledger.void(
            args.account_id,
            args.grant_id,
            idempotency_key=body.idempotency_key,
            reason=body.reason,
            created_by="cli",
        )
        _credits_to_gate(ledger, args.account_id)
    _print_json({**EntryOut.of(entry).model_dump(mode="json"), "created": made})
    return 0


def cmd_credits_balance(args: argparse.Namespace) -> int:
    from meterline.money import format_usd

    with _ledger() as ledger:
        balance = ledger.balance(args.account_id)
    print(
        f"account {balance.account_id}: balance ${format_usd(balance.balance_picos)}, "
        f"available ${format_usd(balance.available_picos)}, owed ${format_usd(balance.owed_picos)}"
    )
    print(f"{'grant':<20} {'kind':<12} {'priority':>8} {'left':>14} {'of':>14}  expires")
    for g in balance.grants:
        expires = g.expires_at.isoformat() if g.expires_at else "never"
        print(
            f"{g.grant_id:<20} {g.kind.value:<12} {g.priority:>8} "
            f"{format_usd(g.remaining_picos):>14} {format_usd(g.amount_picos):>14}  {expires}"
        )
    return 0


def cmd_credits_ledger(args: argparse.Namespace) -> int:
    from meterline.money import format_usd

    with _ledger() as ledger:
        entries = ledger.entries(args.account_id, limit=args.limit)
    print(f"{'entry':>8} {'kind':<10} {'amount':>16}  {'effective at':<32} detail")
    for e in entries:
        detail = e.reason or (f"{e.events} events" if e.events else e.grant_id or "")
        print(
            f"{e.entry_id:>8} {e.kind.value:<10} {format_usd(e.amount_picos):>16}  "
            f"{e.effective_at.isoformat():<32} {detail}"
        )
    return 0


def cmd_credits_check(args: argparse.Namespace) -> int:
    """Through the HTTP API, which holds the warehouse (an embedded chDB only it opens)."""
    from urllib.parse import quote

    params = {name: value for name, value in (("from", args.start), ("to", args.end)) if value}
    found = _api_get(
        _api_url(args.api),
        f"/v1/accounts/{quote(args.account_id, safe='')}/ledger/check",
        _key(args.key, "admin"),
        params,
    )
    verdict = "agree" if found["agrees"] else "DIFFER"
    print(
        f"account {found['account_id']}, {found['start']} to {found['end']}: ledger and "
        f"warehouse {verdict}: debited {found['ledger_events']} events, "
        f"${found['ledger_usd']}; warehouse {found['warehouse_events']}, "
        f"${found['warehouse_usd']}"
    )
    for what in ("missing", "extra", "differing"):
        if found[what]:
            print(f"  {what}: {', '.join(found[what])}")
    return 0 if found["agrees"] else 1


def _invalid(what: str, exc: ValidationError, whole: str) -> ValueError:
    """The arguments' problems, each with its field (``limits.spend_per_month_usd``);
    ``whole`` names the argument when the problem is all of it."""
    problems = "; ".join(
        f"{'.'.join(str(part) for part in e['loc']) or whole}: {e['msg']}" for e in exc.errors()
    )
    return ValueError(f"invalid {what}: {problems}")


def _print_plans(plans: list[PlanVersion]) -> None:
    from meterline.money import format_usd

    print(f"{'plan':<24} {'version':>7} {'billing':<9} {'multiplier':>10} {'fee':>10}  name")
    for p in plans:
        print(
            f"{p.plan_id:<24} {p.version:>7} {p.billing:<9} {format_usd(p.price_multiplier):>10} "
            f"{format_usd(p.request_fee_usd):>10}  {p.name}"
        )


def cmd_plans_create(args: argparse.Namespace) -> int:
    """Through the API's own body schema: the same rules, the same field names."""
    from meterline.quotas.schemas import PlanIn, PlanVersionOut

    try:
        plan = PlanIn.model_validate(json.loads(args.json))
    except ValidationError as exc:
        raise _invalid("plan", exc, "--json") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid plan: --json is not JSON ({exc})") from None
    with _plans() as plans:
        made = plans.add_version(plan)
    _print_json(PlanVersionOut.of(made).model_dump(mode="json"))
    return 0


def cmd_plans_list(args: argparse.Namespace) -> int:
    with _plans() as plans:
        _print_plans(plans.plans())
    return 0


def cmd_plans_versions(args: argparse.Namespace) -> int:
    with _plans() as plans:
        _print_plans(plans.versions(args.plan_id))
    return 0


def cmd_plans_assign(args: argparse.Namespace) -> int:
    from meterline.quotas.schemas import AssignmentIn, AssignmentOut

    fields = {"plan_id": args.plan_id, "version": args.version, "effective_from": args.start}
    try:
        wanted = AssignmentIn.model_validate(fields)
    except ValidationError as exc:
        raise _invalid("assignment", exc, "arguments") from None
    with _plans() as plans:
        assigned = plans.assign(
            args.account_id,
            wanted.plan_id,
            wanted.version,
            wanted.effective_from or datetime.now(UTC),
            "cli",
        )
    _print_json(AssignmentOut.of(assigned).model_dump(mode="json"))
    return 0


def cmd_plans_show(args: argparse.Namespace) -> int:
    from meterline.quotas.schemas import AccountPlanOut

    with _plans() as plans:
        found = plans.plan_of(args.account_id, datetime.now(UTC))
    if found is None:
        raise PlanNotFound(f"no plan assigned to account {args.account_id!r}")
    _print_json(AccountPlanOut.of(*found).model_dump(mode="json"))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from meterline.lib.warehouse.schema import schema_sql

    print(schema_sql(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterline",
        description="Usage metering and billing for LLM gateways. "
        "Configuration comes from METERLINE_* environment variables (see README).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser(
        "up", help="run everything on this machine (embedded Kafka and ClickHouse)"
    ).set_defaults(func=cmd_up)
    sub.add_parser("ingest", help="run the ingest gRPC service").set_defaults(func=cmd_ingest)
    sub.add_parser("pipeline", help="run one pricing pipeline instance").set_defaults(
        func=cmd_pipeline
    )
    sub.add_parser("api", help="run the HTTP API").set_defaults(func=cmd_api)

    sim = sub.add_parser("simulate", help="act as a gateway: send usage over gRPC")
    sim.add_argument(
        "--target", help="ingest address (default: 127.0.0.1 and METERLINE_GRPC_PORT, 50051)"
    )
    sim.add_argument("--rate", type=float, default=200.0, help="events per second")
    sim.add_argument("--duration", type=float, default=10.0, help="seconds")
    sim.add_argument("--accounts", type=int, default=20, help="distinct accounts")
    sim.add_argument("--batch", type=int, default=50, help="events per ReportUsage call")
    sim.add_argument("--seed", type=int, default=None, help="random seed, for a repeatable mix")
    sim.add_argument(
        "--key",
        help="service API key (default: METERLINE_KEY, else the one `meterline up` wrote "
        "to <data dir>/keys.json)",
    )
    sim.add_argument(
        "--check-quota",
        action="store_true",
        help="ask the QuotaService before each request, as a gateway enforcing plans does; "
        "a denied request is not reported",
    )
    sim.add_argument(
        "--quota-target",
        help="QuotaService address (implies --check-quota; default: 127.0.0.1 and "
        "METERLINE_QUOTA_PORT, 50052)",
    )
    sim.add_argument(
        "--run-tag",
        help="the accounts are sim-<tag>-000 and on (default: a new random tag); give one to "
        "simulate accounts that exist, e.g. on a plan",
    )
    sim.set_defaults(func=cmd_simulate)

    quota = sub.add_parser(
        "quota", help="an account's limits now: used, cap, remaining (from the HTTP API)"
    )
    quota.add_argument("account_id")
    quota.add_argument("--api-key-id", help="also the limits of this API key of the account")
    quota.add_argument("--model", help="also the limits of the plan's patterns this model matches")
    quota.add_argument(
        "--api", help="the HTTP API's URL (default: 127.0.0.1 and METERLINE_HTTP_PORT, 8000)"
    )
    quota.add_argument(
        "--key",
        help="an API key that may read the account (default: METERLINE_KEY, else the admin "
        "key `meterline up` wrote to <data dir>/keys.json)",
    )
    quota.set_defaults(func=cmd_quota)

    sub.add_parser("schema", help="print the warehouse DDL").set_defaults(func=cmd_schema)
    rep = sub.add_parser("reprice", help="price events stored unpriced, now that prices exist")
    rep.add_argument("--from", dest="start", required=True, help="ISO 8601 start, inclusive")
    rep.add_argument("--to", dest="end", required=True, help="ISO 8601 end, exclusive")
    rep.add_argument("--account", action="append", help="only this account (repeatable)")
    rep.set_defaults(func=cmd_reprice)

    accounts = sub.add_parser("accounts", help="create, list, show, update, suspend accounts")
    asub = accounts.add_subparsers(dest="accounts_command", required=True)
    acreate = asub.add_parser("create", help="a new account")
    acreate.add_argument("account_id", help="the account_id gateways send in usage events")
    ashow = asub.add_parser("show", help="one account")
    ashow.add_argument("account_id")
    ashow.set_defaults(func=cmd_accounts_show)
    alist = asub.add_parser("list", help="accounts in id order, a page at a time")
    alist.add_argument("--after", help="the last account_id of the previous page")
    alist.add_argument("--limit", type=int, default=100)
    alist.set_defaults(func=cmd_accounts_list)
    aupdate = asub.add_parser("update", help="change name, timezone or metadata")
    aupdate.add_argument("account_id")
    for parser_ in (acreate, aupdate):
        parser_.add_argument("--name")
        parser_.add_argument("--metadata", help="a JSON object")
    acreate.add_argument(
        "--timezone", default="UTC", help="IANA name; its days and months are the account's"
    )
    aupdate.add_argument("--timezone", help="IANA name")
    acreate.set_defaults(func=cmd_accounts_create)
    aupdate.set_defaults(func=cmd_accounts_update)
    for verb, what in (("suspend", "suspend an account"), ("reactivate", "make it active again")):
        status = asub.add_parser(verb, help=what)
        status.add_argument("account_id")
        status.set_defaults(func=cmd_accounts_update)

    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kcreate = ksub.add_parser("create", help="a new key, shown once")
    kcreate.add_argument(
        "--kind",
        required=True,
        choices=["admin", "service", "account"],
        help="admin: everything; service: a gateway (reports usage); account: reads one account",
    )
    kcreate.add_argument("--name")
    kcreate.add_argument("--account", help="account keys: the account it reads")
    kcreate.add_argument(
        "--scope",
        action="append",
        help="service keys: an account it acts for (repeatable; default all)",
    )
    kcreate.add_argument("--expires", help="ISO 8601 instant it stops working")
    kcreate.set_defaults(func=cmd_keys_create)
    klist = ksub.add_parser("list", help="keys, without their secrets")
    klist.add_argument("--account", help="only keys of or scoped to this account")
    klist.set_defaults(func=cmd_keys_list)
    krevoke = ksub.add_parser("revoke", help="revoke a key (every replica within seconds)")
    krevoke.add_argument("key_id")
    krevoke.set_defaults(func=cmd_keys_revoke)

    plans = sub.add_parser("plans", help="create plan versions, put accounts on them")
    psub = plans.add_subparsers(dest="plans_command", required=True)
    pcreate = psub.add_parser("create", help="a plan's next version (1 for a new plan)")
    pcreate.add_argument(
        "--json",
        required=True,
        help='the version, e.g. \'{"plan_id": "pro", "limits": {"requests_per_minute": 600, '
        '"spend_per_month_usd": "500.00"}, "price_multiplier": "1.25"}\'; money as strings',
    )
    pcreate.set_defaults(func=cmd_plans_create)
    psub.add_parser("list", help="the latest version of each plan").set_defaults(
        func=cmd_plans_list
    )
    pversions = psub.add_parser("versions", help="every version of a plan, oldest first")
    pversions.add_argument("plan_id")
    pversions.set_defaults(func=cmd_plans_versions)
    passign = psub.add_parser("assign", help="put an account on a plan, now or from an instant")
    passign.add_argument("account_id")
    passign.add_argument("plan_id")
    passign.add_argument("--version", type=int, help="default: the plan's latest")
    passign.add_argument(
        "--from", dest="start", help="ISO 8601 instant it takes effect (default: now)"
    )
    passign.set_defaults(func=cmd_plans_assign)
    pshow = psub.add_parser("show", help="the plan an account is on now")
    pshow.add_argument("account_id")
    pshow.set_defaults(func=cmd_plans_show)

    credits = sub.add_parser("credits", help="prepaid credits: grants, balance, ledger")
    crsub = credits.add_subparsers(dest="credits_command", required=True)
    key_help = "chosen by you (an order or payment id): the same key again posts nothing"
    cgrant = crsub.add_parser("grant", help="give an account credits")
    cgrant.add_argument("account_id")
    cgrant.add_argument("amount_usd", help='decimal USD, e.g. "25.00"')
    cgrant.add_argument("--idempotency-key", required=True, help=key_help)
    cgrant.add_argument("--kind", choices=["purchased", "promotional"], default=None)
    cgrant.add_argument("--priority", type=int, help="lower is spent first (default 10)")
    cgrant.add_argument("--effective-at", help="ISO 8601 (default: now)")
    cgrant.add_argument("--expires-at", help="ISO 8601 (default: never)")
    cgrant.set_defaults(func=cmd_credits_grant)
    cadjust = crsub.add_parser("adjust", help="credit (+) or debit (-) an account, with a reason")
    cadjust.add_argument("account_id")
    cadjust.add_argument("amount_usd", help='decimal USD, e.g. "-1.50"')
    cadjust.add_argument("--reason", required=True)
    cadjust.add_argument("--idempotency-key", required=True, help=key_help)
    cadjust.set_defaults(func=cmd_credits_adjust)
    cvoid = crsub.add_parser("void", help="release what is left of a grant")
    cvoid.add_argument("account_id")
    cvoid.add_argument("grant_id")
    cvoid.add_argument("--idempotency-key", required=True, help=key_help)
    cvoid.add_argument("--reason", default=None)
    cvoid.set_defaults(func=cmd_credits_void)
    cbalance = crsub.add_parser("balance", help="an account's balance and open grants")
    cbalance.add_argument("account_id")
    cbalance.set_defaults(func=cmd_credits_balance)
    cledger = crsub.add_parser("ledger", help="an account's ledger entries, oldest first")
    cledger.add_argument("account_id")
    cledger.add_argument("--limit", type=int, default=100)
    cledger.set_defaults(func=cmd_credits_ledger)
    ccheck = crsub.add_parser(
        "check", help="does the ledger agree with the warehouse? (from the HTTP API)"
    )
    ccheck.add_argument("account_id")
    ccheck.add_argument("--from", dest="start", help="ISO 8601 (default: the month's start)")
    ccheck.add_argument("--to", dest="end", help="ISO 8601 (default: now)")
    ccheck.add_argument("--api", help="the HTTP API's URL (default: METERLINE_HTTP_PORT)")
    ccheck.add_argument("--key", help="an admin key (default: METERLINE_KEY or keys.json)")
    ccheck.set_defaults(func=cmd_credits_check)

    catalog = sub.add_parser("catalog", help="list, add or import prices")
    csub = catalog.add_subparsers(dest="catalog_command", required=True)
    lst = csub.add_parser("list", help="prices in force (or --all versions)")
    lst.add_argument("--all", action="store_true", help="every version, not only current")
    lst.add_argument("--model", help="only models containing this text")
    lst.set_defaults(func=cmd_catalog_list)
    add = csub.add_parser("add", help="add a price version (USD per million tokens)")
    add.add_argument(
        "--json",
        help="the whole version as JSON instead of the flags; it may also declare "
        '"aliases": ["gpt-4o-2024-08-06"] (dated names that cost this price) and '
        '"dated_aliases": true (every dated name of the model)',
    )
    add.add_argument("--model")
    add.add_argument("--provider")
    add.add_argument("--effective-from", help="ISO 8601 instant, e.g. 2026-12-01T00:00:00Z")
    not_given = {  # what a rate left out costs (meterline.catalog.pricing.FALLBACKS)
        "cache-read": "the input rate",
        "cache-write-5m": "the input rate",
        "cache-write-1h": "the cache-write-5m rate",
        "reasoning": "the output rate",
    }
    for rate in ("input", "output", "cache-read", "cache-write-5m", "cache-write-1h", "reasoning"):
        default = f"; left out: {not_given[rate]}, 0 means free" if rate in not_given else ""
        add.add_argument(f"--{rate}", help=f"{rate} rate, USD per million tokens{default}")
    add.add_argument("--request-fee", help="USD per request")
    add.set_defaults(func=cmd_catalog_add)
    imp = csub.add_parser("import", help="load prices from genai-prices")
    imp.add_argument("--provider", action="append", help="only this provider (repeatable)")
    imp.set_defaults(func=cmd_catalog_import)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log_settings = LogSettings()
    except ValidationError as exc:
        print(f"meterline: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(log_settings.format, logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("aiokafka", "kafka", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except ValidationError as exc:
        print(f"meterline: bad configuration:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (AccountNotFound, KeyNotFound, PlanNotFound) as exc:
        print(f"meterline: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    except (AccountExists, ValueError) as exc:  # the arguments: fix and run again
        print(f"meterline: {exc}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as exc:  # BrokerError, WarehouseError, a port in use
        print(f"meterline: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
