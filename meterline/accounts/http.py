"""Who may call the HTTP API: bearer keys, and the guards every ``/v1`` route declares.

:class:`BearerAuthentication` runs on every route of the application, so a
new route needs a key unless its handler says ``exclude_from_auth=True``
(health, metrics, the OpenAPI; OPTIONS answers, which list the methods of
a route and nothing else, are open too). It asks the injected
:class:`~meterline.accounts.auth.Authenticator`, which holds the keys in
memory: no database round trip per request. A missing, unknown, revoked or
expired key is a 401; a key that may not do what it asks is a 403, from a
guard (:func:`admin_only`, :func:`reads_account`, :func:`any_key`).

Guards run before the handler looks anything up, so a key scoped to one
account gets the same 403 for another account whether that account exists
or not: the answer tells it nothing about other accounts.
"""

from __future__ import annotations

from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.datastructures import Headers
from litestar.exceptions import (
    HTTPException,
    ImproperlyConfiguredException,
    NotAuthorizedException,
    PermissionDeniedException,
)
from litestar.handlers import BaseRouteHandler
from litestar.middleware import ASGIMiddleware
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
from litestar.types import ASGIApp, Receive, Scope, Send

from meterline.accounts.auth import Authenticator, Unauthenticated, bearer_token
from meterline.accounts.model import (
    MAX_ACCOUNT_ID_LENGTH,
    AccountNotFound,
    Principal,
    account_id_problem,
)

__all__ = [
    "ACCESS_ERRORS",
    "BEARER_COMPONENTS",
    "KEY_REQUIRED",
    "OPEN",
    "BearerAuthentication",
    "admin_only",
    "any_key",
    "path_account",
    "principal_of",
    "reads_account",
]

#: The handler ``opt`` key of the routes anyone may call (``@get(..., exclude_from_auth=True)``).
OPEN: Final = "exclude_from_auth"
_SCHEME = "bearer"
#: The OpenAPI security scheme, for the application's ``OpenAPIConfig(components=...)``.
BEARER_COMPONENTS = Components(
    security_schemes={
        _SCHEME: SecurityScheme(
            type="http",
            scheme="bearer",
            bearer_format="mlk_<key id>_<secret>",
            description="An API key: admin, service (a gateway) or account.",
        )
    }
)
#: The OpenAPI security requirement of every authenticated route (a controller's ``security``).
KEY_REQUIRED: list[SecurityRequirement] = [{_SCHEME: []}]
#: What an authenticated route answers besides its own errors (for a handler's ``raises``).
ACCESS_ERRORS: list[type[HTTPException]] = [NotAuthorizedException, PermissionDeniedException]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class BearerAuthentication(ASGIMiddleware):
    """Puts the :class:`Principal` of ``Authorization: Bearer <key>`` in ``scope["user"]``.

    An :class:`ASGIMiddleware` rather than Litestar's older
    ``AbstractAuthenticationMiddleware``: the authenticator comes in a typed
    constructor, as the application's other middleware takes its registry.
    OPTIONS is let through, as that one does too: Litestar answers it with
    the route's methods and nothing else, and browsers send it (a CORS
    preflight) without credentials.
    """

    exclude_opt_key = OPEN

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        if scope.get("method") == "OPTIONS":
            await next_app(scope, receive, send)
            return
        key = bearer_token(Headers.from_scope(scope).get("authorization"))
        try:
            principal = self.authenticator.authenticate(key)
        except Unauthenticated as exc:
            raise NotAuthorizedException(str(exc), headers=_CHALLENGE) from None
        scope["user"] = principal
        scope["auth"] = principal.key_id
        await next_app(scope, receive, send)


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Who asks; a 401 on a route that skipped authentication (a guard fails closed)."""
    principal = connection.scope.get("user")
    if not isinstance(principal, Principal):
        raise NotAuthorizedException(
            "no API key: send Authorization: Bearer <key>", headers=_CHALLENGE
        )
    return principal


def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """Managing accounts, keys and prices."""
    if not principal_of(connection).is_admin:
        raise PermissionDeniedException("this needs an admin key")


def reads_account(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """An account's own data: its path's ``{account_id}`` must be one the key may read.

    The detail does not name the account, so the answer is the same for every
    account the key may not read, existing or not.
    """
    account_id = connection.path_params.get("account_id")
    if not isinstance(account_id, str):
        raise ImproperlyConfiguredException("reads_account guards routes with an {account_id}")
    if not principal_of(connection).may_read(account_id):
        raise PermissionDeniedException("this key may not read this account")


def any_key(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """What every valid key may read (the price catalog)."""
    principal_of(connection)


def path_account(account_id: str) -> str:
    """A path's account id; one no account could have is a 404, as an absent one is."""
    if account_id_problem(account_id) is not None:
        raise AccountNotFound(f"no account {account_id[:MAX_ACCOUNT_ID_LENGTH]!r}")
    return account_id
