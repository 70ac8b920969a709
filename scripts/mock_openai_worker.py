"""An OpenAI-compatible mock inference server driven by the simulated engine.

``POST /v1/completions`` (streaming SSE, or one JSON body with ``"stream": false``) answers
with exactly what the ``sim`` engine of a node agent produces for the same prompt, seed and
sampling, at the same pace: the engine object itself (``node_agent.engines.sim.SimEngine``)
generates, so TTFT, inter-token latency, ``itl_growth`` and ``max_concurrency`` queueing are the
agent's. One SSE event per engine delta, vLLM's shape::

    data: {"id": ..., "object": "text_completion", "created": ..., "model": ...,
           "choices": [{"index": 0, "text": " baka", "logprobs": null,
                        "finish_reason": null, "stop_reason": null}]}

then, when the request asks for it (``stream_options.include_usage``), a chunk with empty
``choices`` and the ``usage``, and ``data: [DONE]``. With ``"return_token_ids": true`` each
choice also carries the chunk's ``token_ids``.

Also served, for routers that probe their workers (vllm-router): ``GET /health``,
``GET /v1/models``, ``GET /get_server_info``, ``GET /get_model_info``, ``GET /version``.

Used by ``scripts/bench_peers.py`` as the worker behind vllm-router:

    .venv/bin/python scripts/mock_openai_worker.py --port 0 --port-file /tmp/w.port \\
        --sim-ttft-ms 20 --sim-itl-ms 20 --sim-itl-growth 0 --sim-max-concurrency 256
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web

from node_agent.engine import Delta, EngineError, EngineRequest
from node_agent.engines.sim import SimConfig, SimEngine
from omni_rpc.validation import Sampling

ENGINE_KEY = web.AppKey("engine", SimEngine)
MODEL_KEY = web.AppKey("model", str)
_ids = itertools.count(1)


class BadRequest(ValueError):
    """The request body does not describe a completion this server can make."""


def engine_request(body: dict[str, Any], request_id: str) -> EngineRequest:
    """The simulated engine's request for an OpenAI completions body."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    text, token_ids = "", ()
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        token_ids = tuple(prompt)
    else:
        raise BadRequest("prompt must be a string or a list of token ids")
    max_tokens = body.get("max_tokens")
    max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default
    if not isinstance(max_tokens, int) or max_tokens <= 0:
        raise BadRequest("max_tokens must be a positive integer")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    seed = body.get("seed")
    sampling = Sampling(
        max_tokens=max_tokens,
        seed=seed if isinstance(seed, int) else None,
        stop=stop,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )
    return EngineRequest(
        request_id=request_id, sampling=sampling, prompt=text, prompt_token_ids=token_ids
    )


def chunk(
    completion_id: str, created: int, model: str, delta: Delta, with_ids: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "text": delta.text,
        "logprobs": None,
        "finish_reason": delta.finish_reason,
        "stop_reason": None,
    }
    if with_ids:
        choice["token_ids"] = list(delta.token_ids)
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage(delta: Delta) -> dict[str, int]:
    return {
        "prompt_tokens": delta.prompt_tokens,
        "completion_tokens": delta.completion_tokens,
        "total_tokens": delta.prompt_tokens + delta.completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def sse_events(
    engine: SimEngine, body: dict[str, Any], model: str, request_id: str
) -> AsyncGenerator[bytes, None]:
    """The SSE byte chunks of one streaming completion (``[DONE]`` included)."""
    request = engine_request(body, request_id)
    created = int(time.time())
    with_ids = bool(body.get("return_token_ids", False))
    options = body.get("stream_options") or {}
    last: Delta | None = None
    async for delta in engine.generate(request):
        last = delta
        yield sse(chunk(request_id, created, model, delta, with_ids))
    if last is not None and options.get("include_usage"):
        final = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(last),
        }
        yield sse(final)
    yield sse("[DONE]")


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE_KEY]
    model = request.app[MODEL_KEY]
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return error(400, "the body is not JSON")
    if not isinstance(body, dict):
        return error(400, "the body must be a JSON object")
    request_id = f"cmpl-{os.getpid()}-{next(_ids)}"
    try:
        engine_request(body, request_id)  # validates before any byte is sent
    except BadRequest as exc:
        return error(400, str(exc))
    if not body.get("stream", False):
        return await complete(engine, body, model, request_id)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    events = sse_events(engine, body, model, request_id)
    try:
        async for data in events:
            await response.write(data)
    except EngineError as exc:
        await response.write(sse({"error": {"message": str(exc), "type": "engine_error"}}))
    finally:
        await events.aclose()  # a client that left: the engine aborts the request
    await response.write_eof()
    return response


async def complete(
    engine: SimEngine, body: dict[str, Any], model: str, request_id: str
) -> web.Response:
    request = engine_request(body, request_id)
    text, ids, last = "", [], Delta()
    try:
        async for delta in engine.generate(request):
            text += delta.text
            ids += delta.token_ids
            last = delta
    except EngineError as exc:
        return error(503, str(exc))
    choice: dict[str, Any] = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": last.finish_reason,
        "stop_reason": None,
    }
    if body.get("return_token_ids"):
        choice["token_ids"] = ids
    return web.json_response(
        {
            "id": request_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage(last),
        }
    )


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


async def health(request: web.Request) -> web.Response:
    healthy = request.app[ENGINE_KEY].is_healthy()
    return web.Response(status=200 if healthy else 503)


async def models(request: web.Request) -> web.Response:
    model = request.app[MODEL_KEY]
    return web.json_response(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "omni-rpc-sim"}],
        }
    )


async def server_info(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    return web.json_response(
        {
            "model": request.app[MODEL_KEY],
            "engine": "sim",
            "ttft_ms": engine.cfg.ttft_ms,
            "itl_ms": engine.cfg.itl_ms,
            "itl_growth": engine.cfg.itl_growth,
            "max_concurrency": engine.cfg.max_concurrency,
            "load": engine.load().__dict__,
        }
    )


async def model_info(request: web.Request) -> web.Response:
    model = request.app[MODEL_KEY]
    return web.json_response(
        {"model_path": model, "served_model_name": model, "is_generation": True}
    )


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": "omni-rpc-sim"})


def build_app(cfg: SimConfig) -> web.Application:
    app = web.Application()
    engine = SimEngine(cfg)
    app[ENGINE_KEY] = engine
    app[MODEL_KEY] = cfg.model

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await engine.start()
        yield
        await engine.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/get_server_info", server_info)
    app.router.add_get("/get_model_info", model_info)
    app.router.add_get("/version", version)
    return app


def build_parser() -> argparse.ArgumentParser:
    defaults = SimConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once serving")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--sim-ttft-ms", type=float, default=defaults.ttft_ms)
    p.add_argument("--sim-itl-ms", type=float, default=defaults.itl_ms)
    p.add_argument("--sim-itl-growth", type=float, default=defaults.itl_growth)
    p.add_argument("--sim-max-concurrency", type=int, default=defaults.max_concurrency)
    return p


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        ttft_ms=args.sim_ttft_ms,
        itl_ms=args.sim_itl_ms,
        itl_growth=args.sim_itl_growth,
        max_concurrency=args.sim_max_concurrency,
        model=args.model,
    )


async def serve(args: argparse.Namespace) -> None:
    runner = web.AppRunner(build_app(config_from(args)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    port = int(runner.addresses[0][1])  # the bound port, also when 0 was asked for
    if args.port_file:
        tmp = args.port_file.with_suffix(".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)
    print(f"mock OpenAI worker on http://{args.host}:{port} (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
