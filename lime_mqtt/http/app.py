"""The bridge's HTTP routes, on Starlette (an ASGI toolkit) served by uvicorn.

- ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``: OpenAI's API; every call
  is one MQTT request under the client identity its API key maps to.
- ``/``: the dashboard (static files that ship with the package: no internet needed);
  ``/api/cluster``: its data now; ``/api/events``: the same, pushed as server-sent events
  whenever the cluster changes.
- ``/metrics``: Prometheus.
- ``/healthz``: 200 while a coordinator serves the cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from importlib import resources
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from lime_mqtt.client import ClientSession
from lime_mqtt.core.errors import LimeError
from lime_mqtt.http import openai_api
from lime_mqtt.http.metrics import BridgeMetrics
from lime_mqtt.http.openai_api import ApiError, Call, Kind
from lime_mqtt.watch import ClusterWatch

log = logging.getLogger(__name__)

STATIC = resources.files("lime_mqtt.http") / "static"
EVENT_HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing an idle stream
MAX_BODY_BYTES = 1024 * 1024


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Sessions:
    """Which client session (MQTT identity) serves a caller: by the SHA-256 of its API key,
    or the one open session when no keys are configured."""

    def __init__(self, by_key_digest: dict[str, ClientSession], open_session: ClientSession | None) -> None:
        self.by_key_digest = by_key_digest
        self.open_session = open_session

    def for_request(self, request: Request) -> ClientSession:
        if self.open_session is not None:
            return self.open_session
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "an API key is needed: send 'Authorization: Bearer <key>'", "invalid_request_error",
                           "invalid_api_key")
        digest = key_digest(key.strip())
        for known, session in self.by_key_digest.items():
            if hmac.compare_digest(known, digest):
                return session
        raise ApiError(401, "the API key is not known to this bridge", "invalid_request_error", "invalid_api_key")


def _sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


def create_app(watch: ClusterWatch, sessions: Sessions, metrics: BridgeMetrics) -> Starlette:
    def error_response(exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def served_models() -> list[str]:
        return sorted({c.model for c in watch.view.coordinators.values()})

    async def models(request: Request) -> Response:
        try:
            sessions.for_request(request)
        except ApiError as exc:
            return error_response(exc)
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "lime-mqtt"} for m in served_models()]})

    async def body_of(request: Request) -> object:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body has {len(raw)} bytes; at most {MAX_BODY_BYTES} are accepted",
                           code="request_too_large")
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None

    def endpoint(kind: Kind) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        name = "chat/completions" if kind == "chat" else "completions"

        async def handle(request: Request) -> Response:
            metrics.http_in_flight.inc()
            status = 200
            try:
                session = sessions.for_request(request)
                call = openai_api.parse_call(kind, await body_of(request))
                models_now = served_models()
                if not models_now:
                    raise ApiError(503, f"no coordinator is serving cluster {watch.view.topics.cluster!r}",
                                   "server_error", "no_coordinator")
                if call.model not in models_now:
                    raise ApiError(404, f"the model {call.model!r} is not served here; models: "
                                   f"{', '.join(models_now)}", "invalid_request_error", "model_not_found", "model")
                if call.stream:
                    answers = session.ask(call.request)
                    first = await _first_answer(answers)  # an error before any text is an HTTP error
                    return CancellingStream(_stream(call, first, answers), media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                return JSONResponse(await _whole(call, session, request))
            except ApiError as exc:
                status = exc.status
                return error_response(exc)
            finally:
                metrics.http_in_flight.dec()
                metrics.http_requests.labels(name, str(status)).inc()

        return handle

    async def cluster(request: Request) -> Response:
        return JSONResponse(watch.snapshot())

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            version = -1
            while True:
                now = await watch.changed(version, EVENT_HEARTBEAT_S)
                if now == version:
                    yield b": still here\n\n"
                    continue
                version = now
                yield _sse(watch.snapshot())

        return CancellingStream(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def scrape(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        serving = bool(watch.view.coordinators)
        return JSONResponse({"coordinators": watch.view.serving_coordinators()}, status_code=200 if serving else 503)

    async def index(request: Request) -> Response:
        return FileResponse(str(STATIC / "index.html"))

    return Starlette(routes=[
        Route("/", index),
        Route("/v1/models", models),
        Route("/v1/chat/completions", endpoint("chat"), methods=["POST"]),
        Route("/v1/completions", endpoint("completion"), methods=["POST"]),
        Route("/api/cluster", cluster),
        Route("/api/events", events),
        Route("/metrics", scrape),
        Route("/healthz", health),
        Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
    ])


async def _first_answer(answers: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """The first message of an answer; :class:`ApiError` if it is an error or none comes."""
    try:
        first = await anext(answers)
    except TimeoutError as exc:
        raise ApiError(504, str(exc), "server_error", "timeout") from None
    except LimeError as exc:
        raise ApiError(503, str(exc), "server_error", "no_coordinator") from None
    if first.get("type") == "error":
        raise openai_api.from_lime_error(first.get("error") or {})
    return first


async def _stream(call: Call, first: dict[str, Any], answers: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events from the cluster's messages. If the caller goes away, Starlette
    cancels this generator, and the session cancels the request on the cluster."""
    opening = openai_api.first_event(call)
    if opening is not None:
        yield _sse(opening)
    answer: dict[str, Any] | None = first
    try:
        while answer is not None:
            kind = answer.get("type")
            if kind == "chunk" and answer.get("text"):
                yield _sse(openai_api.stream_event(call, answer["text"]))
            elif kind == "final":
                yield _sse(openai_api.stream_event(call, None, answer.get("finish_reason")))
                if call.include_usage:
                    yield _sse(openai_api.usage_event(call, answer.get("usage")))
                break
            elif kind == "error":
                yield _sse(openai_api.from_lime_error(answer.get("error") or {}).body())
                break
            answer = await anext(answers, None)
    except (TimeoutError, LimeError) as exc:
        yield _sse(ApiError(504, str(exc), "server_error", "timeout").body())
    finally:
        await answers.aclose()  # type: ignore[attr-defined]  # an async generator: cancels if unfinished
    yield _sse("[DONE]")


async def _whole(call: Call, session: ClientSession, request: Request) -> dict[str, Any]:
    """The whole answer; a caller that disconnects first cancels the request."""
    async def final() -> dict[str, Any]:
        last: dict[str, Any] = {}
        answers = session.ask(call.request)
        try:
            async for answer in answers:
                last = answer
        finally:
            await answers.aclose()  # type: ignore[attr-defined]
        return last

    answering = asyncio.create_task(final(), name=f"{call.id}-answer")  # owned: awaited or cancelled below
    leaving = asyncio.create_task(_disconnected(request.receive), name=f"{call.id}-disconnect")
    try:
        await asyncio.wait({answering, leaving}, return_when=asyncio.FIRST_COMPLETED)
        if not answering.done():
            raise ApiError(499, "the client closed the connection", code="cancelled")
        try:
            last = answering.result()
        except TimeoutError as exc:
            raise ApiError(504, str(exc), "server_error", "timeout") from None
        except LimeError as exc:
            raise ApiError(503, str(exc), "server_error", "no_coordinator") from None
    finally:
        for task in (answering, leaving):
            task.cancel()  # an unfinished answer: its session cancels the request on the cluster
        await asyncio.gather(answering, leaving, return_exceptions=True)
    if last.get("type") == "error":
        raise openai_api.from_lime_error(last.get("error") or {})
    if last.get("type") != "final":
        raise ApiError(502, "the cluster's answer ended without a final message", "server_error")
    return openai_api.completion(call, last)


async def _disconnected(receive: Receive) -> None:
    """Until the client goes (the request's body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class CancellingStream(StreamingResponse):
    """A stream that ends as soon as its client goes, whatever ASGI version the server
    speaks: it listens for the disconnect while it streams, and then closes its source (so
    an answer's request is cancelled at once, not at the next chunk that cannot be sent)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.create_task(self.stream_response(send), name="sse-stream")  # owned: awaited below
        leaving = asyncio.create_task(_disconnected(receive), name="sse-disconnect")
        try:
            await asyncio.wait({streaming, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, leaving):
                task.cancel()
            results = await asyncio.gather(streaming, leaving, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # our async generators
        error = results[0]
        if isinstance(error, Exception) and not isinstance(error, OSError):
            raise error  # a failure of the stream itself, not a client that went
