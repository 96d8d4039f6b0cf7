"""The ASGI app (Starlette) behind `jumpflow serve`: the page, the model card and micro-batched generation.

GET /health, GET /model, POST /generate ({n, steps, seed, class, guidance, format, model} -> image/png or JSON), GET /
(the page). Every refused request is a 4xx JSON {"error": message}; an unexpected failure is a 500 JSON without a
traceback (logged on the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any, Optional

import torch
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import JumpflowError
from .batcher import MicroBatcher, QueueFull
from .card import check_teacher, describe, teacher_card
from .generate import BadRequest, SampleRunner, parse_request
from .page import PAGE
from .render import Frame, render

log = logging.getLogger("jumpflow.serve")
MAX_BODY_BYTES = 64 * 1024


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class ClientLeft(Exception):
    """The client disconnected before its samples were ready."""


async def _unless_client_leaves(request: Request, work):
    """Await `work` unless the client disconnects first; then cancel it (a queued request is dropped before it runs).
    After the body is read, the next ASGI message can only be the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not watcher.done():
            watcher.cancel()
    if task.done():
        return task.result()
    if watcher.result().get("type") == "http.disconnect":
        task.cancel()
        raise ClientLeft()
    return await task  # another message (none is expected after the body): keep waiting for the work


def create_app(model, teacher=None, max_n: int = 1024, batch_window_ms: float = 5.0, max_batch: int = 4096,
               max_queue: int = 64, batching: bool = True) -> Starlette:
    """The app for a loaded model (`jumpflow.load`) and optionally its multi-step teacher, compared at 100 steps."""
    if max_n < 1 or max_batch < max_n:
        raise JumpflowError(f"need 1 <= max_n <= max_batch, got max_n={max_n}, max_batch={max_batch}")
    if teacher is not None:
        check_teacher(model, teacher)
    models = {"student": model, "teacher": teacher}
    cards = {"student": describe(model), "teacher": teacher_card(teacher)}
    try:
        batcher = MicroBatcher(SampleRunner(models), window_s=batch_window_ms / 1000.0, max_batch=max_batch,
                               max_queue=max_queue, enabled=batching)
    except ValueError as e:
        raise JumpflowError(f"bad batching settings: {e}") from e
    frame = None
    if model.info.kind != "image":  # the scatter's fixed window, from the model's own samples
        frame = Frame.around(model.generate(2048, seed=0, steps=cards["student"]["default_steps"]))
    to_image = getattr(model, "to_image", None)  # images: the model's own grid; vectors: our fixed-frame scatter
    card = {**cards["student"], "teacher": cards["teacher"], "max_n": max_n,
            "batching": {"enabled": batching, "window_ms": batch_window_ms, "max_batch": max_batch,
                         "max_queue": max_queue}}

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "method": card["method"], "waiting": batcher.waiting,
                             "forward_passes": batcher.forward_passes, "requests_served": batcher.requests_served})

    async def model_card(request: Request) -> JSONResponse:
        return JSONResponse(card)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE)

    async def generate(request: Request) -> Response:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(f"request body over {MAX_BODY_BYTES} bytes", 413)
        try:
            req = parse_request(json.loads(body or b"{}"), cards, max_n)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            return _error(f"the body is not valid JSON: {e}", 400)
        except BadRequest as e:
            return _error(str(e), e.status)
        try:
            result = await _unless_client_leaves(request, batcher.submit(req.key, (req.n, req.seed), size=req.n))
        except ClientLeft:  # the page aborted a request a newer one made stale: nothing to compute or answer
            return Response(status_code=204)
        except QueueFull as e:
            return _error(str(e), 503)
        except JumpflowError as e:  # the model refused the options (e.g. a step count its method cannot take)
            return _error(str(e), 400)
        headers = {"X-Generation-Ms": f"{result.generation_s * 1000:.3f}", "X-Queue-Ms": f"{result.queue_s * 1000:.3f}",
                   "X-Batch-Requests": str(result.batch_requests), "X-Batch-Size": str(result.batch_size),
                   "X-Seed": str(req.seed), "X-Steps": str(req.steps), "Cache-Control": "no-store"}
        samples: torch.Tensor = result.value
        if req.format == "json":
            return JSONResponse({"samples": samples.tolist(), "shape": list(samples.shape), "seed": req.seed,
                                 "steps": req.steps, "class": req.cls, "guidance": req.guidance, "model": req.model,
                                 "generation_ms": result.generation_s * 1000, "batch_requests": result.batch_requests},
                                headers=headers)
        png = await asyncio.to_thread(render, samples, frame, to_image)  # off the loop and off the inference thread
        return Response(png, media_type="image/png", headers=headers)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(f"{exc.detail}: {request.method} {request.url.path}", exc.status_code)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error(f"internal error ({type(exc).__name__}); the server log has the details", 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()

    app = Starlette(routes=[Route("/", page, methods=["GET"]), Route("/health", health, methods=["GET"]),
                            Route("/model", model_card, methods=["GET"]),
                            Route("/generate", generate, methods=["POST"])],
                    exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.batcher, app.state.card, app.state.models = batcher, card, models
    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind before starting uvicorn: a port in use is a clear error, and port 0 picks a free one we can print."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:
        sock.close()
        raise JumpflowError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from e
    return sock


def run_server(ckpt: str, teacher: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
               max_n: int = 1024, batch_window_ms: float = 5.0, max_batch: int = 4096, max_queue: int = 64,
               batching: bool = True, device: str = "auto", log_level: str = "warning", **_: Any) -> None:
    """Load `ckpt` (and `teacher`), then serve until Ctrl-C."""
    import uvicorn

    from ..api import load

    model = load(ckpt, device=device)
    teacher_model = load(teacher, device=device) if teacher else None
    app = create_app(model, teacher_model, max_n=max_n, batch_window_ms=batch_window_ms, max_batch=max_batch,
                     max_queue=max_queue, batching=batching)
    sock = listening_socket(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"jumpflow: serving {model.method.name} ({ckpt}) at http://{shown}:{sock.getsockname()[1]}/ "
          f"(batching {'on, ' + format(batch_window_ms, 'g') + ' ms window' if batching else 'off'}; Ctrl-C stops)",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises Ctrl-C: that is the normal way out
        pass
    print("jumpflow: server stopped", flush=True)
