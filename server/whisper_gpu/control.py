"""The HTTP control API (aiohttp): health, metrics, info, settings and status; see docs/control-api.md."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .model_manager import RestoreFailedError, SettingsNotSavedError
from .service import ModelNotReadyError, ReloadInProgressError, Service, SettingsRejectedError

_LOGGER = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
SERVICE_KEY = web.AppKey("service", Service)
SHUTTING_DOWN_KEY: web.AppKey[Callable[[], bool]] = web.AppKey("shutting_down")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(service: Service, shutting_down: Callable[[], bool]) -> web.Application:
    """The control application."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
    app[SERVICE_KEY] = service
    app[SHUTTING_DOWN_KEY] = shutting_down
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/v1/info", _info)
    app.router.add_get("/api/v1/settings", _get_settings)
    app.router.add_patch("/api/v1/settings", _patch_settings)
    app.router.add_get("/api/v1/status", _status)
    app.router.add_post("/api/v1/model/park", _park)
    app.router.add_post("/api/v1/model/restore", _restore)
    app.router.add_get("/api/v1/auth", _auth)
    return app


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer HTTP errors (404, 405, 413) as JSON like everything else."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": "body_too_large"}, status=413)
    except web.HTTPException as err:
        if err.status < 400:  # noqa: PLR2004 - redirects pass through
            raise
        return web.json_response(
            {"error": err.reason.lower().replace(" ", "_")}, status=err.status, headers=_allow_header(err)
        )


def _allow_header(err: web.HTTPException) -> dict[str, str]:
    allow = err.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def _authorized(request: web.Request) -> bool:
    """Constant-time check of `Authorization: Bearer <token>`."""
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return False
    expected = request.app[SERVICE_KEY].token
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


def _unauthorized() -> web.Response:
    return web.json_response(
        {"error": "unauthorized"}, status=401, headers={"WWW-Authenticate": 'Bearer realm="whisper-gpu"'}
    )


async def _healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    service = request.app[SERVICE_KEY]
    engine = service.models.engine
    if request.app[SHUTTING_DOWN_KEY]():
        return web.json_response({"status": "not_ready", "reason": "shutting_down"}, status=503)
    if engine is None:
        return web.json_response({"status": "not_ready", "reason": str(service.models.state)}, status=503)
    return web.json_response({"status": "ready", "model": engine.name, "state": str(service.models.shown_state)})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVICE_KEY].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _info(request: web.Request) -> web.Response:
    # Off the event loop: it lists the model cache on disk and asks NVML about the GPU, either of which can be slow.
    return web.json_response(await asyncio.to_thread(request.app[SERVICE_KEY].info))


async def _get_settings(request: web.Request) -> web.Response:
    settings = request.app[SERVICE_KEY].settings
    return web.json_response({"settings": settings.values, "source": settings.sources})


def _refuse_constant(name: str) -> Any:
    """NaN and Infinity are not JSON, whatever Python's parser allows."""
    raise ValueError(name)


def parse_body(raw: bytes) -> object | None:
    """The decoded JSON value, or None for anything that is not plain JSON.

    Deep nesting (RecursionError), integers longer than Python converts (ValueError) and NaN are refused here,
    so that no input reaches a traceback.
    """
    try:
        body: object = json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return body


async def _patch_settings(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    body = parse_body(await request.read())
    if not isinstance(body, dict):
        return web.json_response({"errors": {"base": "invalid_json"}}, status=400)
    try:
        result = await request.app[SERVICE_KEY].update_settings(body)
    except SettingsRejectedError as err:
        return web.json_response({"errors": err.errors}, status=400)
    except ReloadInProgressError:
        return web.json_response({"error": "reload_in_progress"}, status=409)
    except SettingsNotSavedError as err:
        _LOGGER.error("Settings change refused: %s", err.message)  # noqa: TRY400 - the disk, not a bug
        status = 507 if err.no_space else 500
        return web.json_response({"error": "save_failed", "message": err.message}, status=status)
    return web.json_response(result)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[SERVICE_KEY].status())


async def _auth(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    return web.Response(status=204)


async def _park(request: web.Request) -> web.Response:
    """Free the model's memory now; answers once the requests in flight have finished and the model is parked."""
    if not _authorized(request):
        return _unauthorized()
    try:
        status = await request.app[SERVICE_KEY].park_now()
    except ReloadInProgressError:
        return web.json_response(
            {"error": "reload_in_progress", "message": "A model is loading; park it once it serves"}, status=409
        )
    except ModelNotReadyError:
        return web.json_response({"error": "model_not_ready", "message": "No model is loaded"}, status=409)
    return web.json_response(status)


async def _restore(request: web.Request) -> web.Response:
    """Bring a parked model back now (a no-op when it is resident)."""
    if not _authorized(request):
        return _unauthorized()
    try:
        status = await request.app[SERVICE_KEY].restore_now()
    except ModelNotReadyError:
        return web.json_response({"error": "model_not_ready", "message": "No model is loaded"}, status=409)
    except RestoreFailedError as err:
        return web.json_response({"error": "restore_failed", "message": str(err)}, status=500)
    return web.json_response(status)
