"""API keys on gRPC: the server checks the ``authorization`` metadata, clients send it.

:class:`AuthInterceptor` authenticates every call except health checks and
reflection (load balancers and grpcurl ask those without a key). It refuses
a call before its handler runs: UNAUTHENTICATED without a valid key,
PERMISSION_DENIED for a key of a kind the service does not take. A call it
lets through runs with the caller's :class:`Principal` in a context
variable, read by :func:`current_principal`; what the key may do for which
account stays the handler's rule (``Principal.may_act_for``).

Which kinds may call which service is the server's policy, one entry per
service: a later service on the same server (quotas) brings its own entry,
and a service without one is refused to every key, so none is open by
omission. :func:`key_channel` is the client's side: a channel that presents
a key on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NoReturn, cast

import grpc
from prometheus_client import Counter

from meterline.accounts.auth import Authenticator, Unauthenticated, bearer_token
from meterline.accounts.model import KeyKind, Principal
from meterline.lib.metrics import CollectorRegistry

__all__ = [
    "AUTHORIZATION",
    "DRAIN_MESSAGES",
    "DRAIN_S",
    "AuthInterceptor",
    "current_principal",
    "is_open",
    "key_channel",
    "key_metadata",
]

#: The metadata key that carries ``Bearer <key>`` (gRPC metadata keys are lower case).
AUTHORIZATION = "authorization"

_HEALTH = "grpc.health.v1.Health"
_REFLECTION = "grpc.reflection."

#: A refused client stream is read, unparsed, until its client stops sending (at most
#: this long, this many messages) before the refusal is sent: a grpc.aio client whose
#: write meets the closed stream reports INTERNAL in place of the refusal
#: (grpc/grpc#36066), and a gateway needs to read "API key ... is revoked".
DRAIN_S = 0.5
DRAIN_MESSAGES = 64

_principal: ContextVar[Principal] = ContextVar("meterline_principal")

if TYPE_CHECKING:  # the stubs make these generic; at run time they are plain classes
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor[Any, Any]
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor[Any, Any]
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor[Any, Any]
    _StreamStream = grpc.aio.StreamStreamClientInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
    _Context = grpc.aio.ServicerContext[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor
    _UnaryUnary = grpc.aio.UnaryUnaryClientInterceptor
    _UnaryStream = grpc.aio.UnaryStreamClientInterceptor
    _StreamUnary = grpc.aio.StreamUnaryClientInterceptor
    _StreamStream = grpc.aio.StreamStreamClientInterceptor
    _Handler = grpc.RpcMethodHandler
    _Context = grpc.aio.ServicerContext

_Behaviour = Callable[[Any, "_Context"], Any]

#: (request streaming, response streaming) -> the handler's attribute, its factory
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., _Handler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def current_principal() -> Principal:
    """Who made the call being handled.

    Raises LookupError outside a call that :class:`AuthInterceptor` let
    through: a handler must never guess who asks.
    """
    try:
        return _principal.get()
    except LookupError:
        raise LookupError("no principal: this call did not pass through AuthInterceptor") from None


def is_open(service: str) -> bool:
    """Whether ``service`` answers without a key: health checks and reflection."""
    return service == _HEALTH or service.startswith(_REFLECTION)


_REFUSED: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def _refused_counter(registry: CollectorRegistry) -> Counter:
    """The registry's one count of refused calls: every gRPC server of a process (ingest,
    quotas) counts in it, by service."""
    if registry not in _REFUSED:
        _REFUSED[registry] = Counter(
            "meterline_grpc_refused",
            "gRPC calls refused before their handler ran, by service and status: "
            "UNAUTHENTICATED (no valid key) or PERMISSION_DENIED (a key of a kind the "
            "service does not take).",
            ("service", "code"),
            registry=registry,
        )
    return _REFUSED[registry]


class AuthInterceptor(_ServerInterceptor):
    """Authenticates each call and runs its handler as the key's :class:`Principal`."""

    def __init__(
        self,
        authenticator: Authenticator,
        *,
        allowed: Mapping[str, Collection[KeyKind]],
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``allowed`` maps a service's full name (``meterline.v1.IngestService``) to
        the key kinds that may call it. ``registry`` gets the count of refused calls."""
        self.authenticator = authenticator
        self.allowed = {service: frozenset(kinds) for service, kinds in allowed.items()}
        self.refused = _refused_counter(registry if registry is not None else CollectorRegistry())

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler: _Handler | None = await continuation(handler_call_details)
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if handler is None or is_open(service):
            return handler  # type: ignore[return-value]  # None: gRPC answers UNIMPLEMENTED
        try:
            principal = self.authenticator.authenticate(
                bearer_token(_authorization(handler_call_details.invocation_metadata))
            )
        except Unauthenticated as exc:
            return self._refuse(handler, service, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if principal.kind not in self.allowed.get(service, ()):
            return self._refuse(
                handler,
                service,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{principal.kind} keys may not call {service}",
            )
        return _rebuilt(handler, _run_as(_behaviour(handler), principal))

    def _refuse(
        self, handler: _Handler, service: str, code: grpc.StatusCode, details: str
    ) -> _Handler:
        self.refused.labels(service, code.name).inc()
        streaming = handler.request_streaming

        async def refuse(request: Any, context: _Context) -> NoReturn:
            if streaming:
                await _drain(request)
            await context.abort(code, details)

        # the caller's request is not parsed: a refused caller costs no deserializing
        return _rebuilt(handler, refuse, request_deserializer=_unread)


def _authorization(metadata: object) -> str | None:
    """The first ``authorization`` value of a call's metadata."""
    for key, value in cast("Collection[tuple[str, str | bytes]]", metadata or ()):
        if key == AUTHORIZATION and isinstance(value, str):
            return value
    return None


def _unread(data: bytes) -> None:
    return None


async def _drain(requests: AsyncIterator[object]) -> None:
    """Read a client stream until it ends, or DRAIN_S or DRAIN_MESSAGES have passed."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_S):
            count = 0
            async for _ in requests:
                count += 1
                if count >= DRAIN_MESSAGES:
                    return


def _behaviour(handler: _Handler) -> _Behaviour:
    attribute, _ = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return cast(_Behaviour, getattr(handler, attribute))


def _rebuilt(
    handler: _Handler,
    behaviour: _Behaviour,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> _Handler:
    """``handler`` of the same kind and serializers, with another behaviour."""
    _, factory = _KINDS[(handler.request_streaming, handler.response_streaming)]
    return factory(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _run_as(behaviour: _Behaviour, principal: Principal) -> _Behaviour:
    """``behaviour`` run with ``principal`` set, in the task that handles the call.

    gRPC tells the handler's style by its function type (coroutine, or async
    generator for streamed responses), so the wrapper keeps that type.
    """
    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: object, context: _Context) -> AsyncIterator[object]:
            token = _principal.set(principal)
            try:
                async for response in behaviour(request, context):
                    yield response
            finally:
                # a generator closed by the loop's finalizer runs in another context
                with contextlib.suppress(ValueError):
                    _principal.reset(token)

        return streaming
    if inspect.iscoroutinefunction(behaviour):

        async def answering(request: object, context: _Context) -> object:
            token = _principal.set(principal)
            try:
                return await behaviour(request, context)
            finally:
                _principal.reset(token)

        return answering
    raise TypeError(f"{behaviour!r} is not a coroutine: AuthInterceptor guards grpc.aio handlers")


# --- the client's side ---------------------------------------------------------------


def key_metadata(key: str) -> tuple[tuple[str, str]]:
    """The call metadata that presents ``key``, for a single call's ``metadata=``."""
    return ((AUTHORIZATION, f"Bearer {key}"),)


class _PresentKey:
    """Adds ``authorization: Bearer <key>`` to a call's metadata."""

    def __init__(self, key: str) -> None:
        (self._metadatum,) = key_metadata(key)

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._metadatum)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# A channel files each interceptor under the first kind it is an instance of:
# one class per kind, so that every call of the channel presents the key.


class _UnaryUnaryKey(_PresentKey, _UnaryUnary):
    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_key(client_call_details), request)


class _UnaryStreamKey(_PresentKey, _UnaryStream):
    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._with_key(client_call_details), request)


class _StreamUnaryKey(_PresentKey, _StreamUnary):
    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_key(client_call_details), request_iterator)


class _StreamStreamKey(_PresentKey, _StreamStream):
    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._with_key(client_call_details), request_iterator)


_KEY_INTERCEPTORS = (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)


def key_channel(
    target: str,
    key: str | None,
    *,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An insecure channel to ``target`` whose every call presents ``key``.

    None presents no key: for a server run with METERLINE_AUTH=off. Make one
    channel per server and reuse it.
    """
    if key is None:
        return grpc.aio.insecure_channel(target, options=options)
    # the stubs type interceptors as a placeholder that asks for a cast
    interceptors: list[Any] = [kind(key) for kind in _KEY_INTERCEPTORS]
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
