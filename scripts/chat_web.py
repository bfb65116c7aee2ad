"""
The web chat: a page, a streaming chat endpoint, and an OpenAI-compatible API, served by uvicorn.

    python -m scripts.chat_web                   # then open the printed URL
    python -m scripts.chat_web -i sft --num-workers 2 --port 8000 --api-key SECRET

Endpoints: GET / (the page), GET /health, GET /stats, POST /chat/completions (SSE token stream for
the page), POST /v1/chat/completions (OpenAI format, stream or not), POST /v1/completions (raw text
completion with prompt log-probabilities: lm-evaluation-harness's local-completions), GET /v1/models.
Requests are validated and answered in nanochat/openai_api.py and served by a pool of workers, one
model replica each, each decoding up to --batch-slots requests together (nanochat/serving.py).

Hostile clients. Any web page can POST to 127.0.0.1, so: POST bodies must be application/json (a
page can send text/plain without asking; JSON needs a CORS preflight, which we never grant), the
Host header must be one of ours (DNS rebinding) and an Origin header, when sent, must be allowed
(loopback with our port, plus --allow-origin). Bodies are counted while they are read (413 past
--max-body-bytes, 408 slower than --body-timeout), both before a worker is taken. A connection must
send a whole request head within --header-timeout seconds (of connecting, or of its last response):
connections that send nothing, or a byte now and then, cannot pile up. At most --limit-concurrency
requests are handled at once (503 beyond), counted in requests, not connections; past
--max-connections the oldest connection still waiting for its head makes room. /docs and
/openapi.json exist only with --docs (behind the API key when one is set). An internal error is
logged with its traceback and answered with a generic 500.
"""

import argparse
import hmac
import json
import os
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from nanochat.engine import Engine
from nanochat.openai_api import (LIMIT_HELP, APIError, Limits, TextCompletion, chat_chunks, chat_completion,
                                 error_response, read_json, text_completion, validate, validate_completion)
from nanochat.serving import RequestLimit, Worker, WorkerPool, guarded_http, reply_job, result, serving_model


class OriginGuard:
    """
    ASGI wrapper: 403 unless the Host header names us (a DNS-rebinding page reaches 127.0.0.1 under its own
    name) and an Origin header, when there is one, is allowed (a browser names the page that sends a request;
    curl and API clients send none).
    """

    def __init__(self, app, origins):
        self.app, self.origins, self.hosts = app, {o.lower().rstrip("/") for o in origins}, set()
        for o in self.origins:
            u = urlsplit(o)
            default = {"http": 80, "https": 443}.get(u.scheme)
            name = u.netloc.rsplit(":", 1)[0] if u.port else u.netloc
            self.hosts |= {u.netloc, name, f"{name}:{default}"} if u.port in (None, default) else {u.netloc}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            host = headers.get(b"host", b"").decode("latin-1").lower()
            origin = headers.get(b"origin", b"").decode("latin-1").lower().rstrip("/") or None
            if host not in self.hosts:  # the messages echo attacker-chosen text: a bounded piece only
                reason = f"Host {host[:100]!r} is not served here; to serve it, start the server with --allow-origin http://{host[:100]}"
            elif origin is not None and origin not in self.origins:
                reason = (f"requests from the web origin {origin[:100]!r} are not allowed; "
                          f"start the server with --allow-origin {origin[:100]}")
            else:
                return await self.app(scope, receive, send)
            refusal = error_response(APIError(403, reason, "permission_error", "origin_not_allowed"))
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(workers, limits=None, api_key=None, model_name="nanochat", origins=None, docs=False):
    """origins: the web origins allowed to call us (Host and Origin checked, see OriginGuard); None checks neither
    (tests, embedding) — the command line always passes loopback on its port + --allow-origin. docs: serve /docs
    and /openapi.json (behind the API key when there is one)."""
    limits = limits or Limits()
    pool = WorkerPool(workers, limits.max_queue, limits.queue_timeout)
    app = FastAPI(title="nanochat", docs_url=None, redoc_url=None, openapi_url=None)  # FastAPI's own: no key check
    if origins is not None:
        app.add_middleware(OriginGuard, origins=origins)
    app.state.pool = pool
    ui_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")
    tokenizer, context = workers[0].tokenizer, workers[0].engine.model.config.sequence_len
    expected_key = f"Bearer {api_key}".encode() if api_key is not None else None

    def check_key(request):
        given = request.headers.get("authorization", "").encode("latin-1")  # starlette decoded it as latin-1
        if expected_key is not None and not hmac.compare_digest(given, expected_key):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")

    async def reply(request, openai):
        """A chat request validated, then its reply job started on a worker: (options, its events)."""
        check_key(request)
        prompt, options = validate(await read_json(request, limits), limits, openai, tokenizer, context)
        return options, await pool.run(reply_job(prompt, options), request.is_disconnected)

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e)

    @app.exception_handler(Exception)
    async def internal_error(request, e):  # starlette logs the traceback too
        return error_response(APIError(500, "internal server error; the details are in the server log", "server_error"))

    @app.get("/")
    async def index():
        with open(ui_path, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    if docs:
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request):
            check_key(request)
            return app.openapi()

        @app.get("/docs", include_in_schema=False)
        async def swagger(request: Request):
            check_key(request)
            return get_swagger_ui_html(openapi_url="/openapi.json", title="nanochat API")

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(workers)}

    @app.get("/stats")
    async def stats(request: Request):
        check_key(request)
        return pool.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):  # the page's own stream: {token}... then {done, finish_reason} (or {error})
        _, events = await reply(request, openai=False)

        async def sse():
            async for kind, payload in events:
                event = ({"token": payload[1]} if kind == "text" else {"error": payload} if kind == "error"
                         else {"done": True, "finish_reason": payload["finish"][0]})
                yield f"data: {json.dumps(event)}\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        options, events = await reply(request, openai=True)
        if options["stream"]:
            return StreamingResponse(chat_chunks(events, model_name, options.get("include_usage")),
                                     media_type="text/event-stream")
        return chat_completion(model_name, await result(events))

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        check_key(request)
        prompts, options = validate_completion(await read_json(request, limits), limits, tokenizer, context)
        events = await pool.run(lambda worker, emit, done: TextCompletion(worker, prompts, options, emit, done),
                                request.is_disconnected)
        return text_completion(model_name, await result(events))

    return app


def main(argv=None):
    import torch
    import uvicorn
    from nanochat.checkpoint import add_checkpoint_args, load_model
    from nanochat.common import autodetect_device_type
    p = argparse.ArgumentParser(description="Serve a chat model: web page + OpenAI-compatible API.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="sft")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--num-workers", type=int, default=None, help="model replicas (default: one per GPU, one on CPU)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), help="require 'Authorization: Bearer KEY'")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="also serve this web origin (scheme://host[:port]) as Host and Origin; repeatable. "
                        "Always served: http://127.0.0.1, localhost and [::1] on --port")
    p.add_argument("--batch-slots", type=int, default=16,
                   help="requests a worker decodes together (continuous batching); 1 = one request at a time")
    p.add_argument("--compile-decode", default="auto", choices=["auto", "on", "off"],
                   help="torch.compile the batched decode step (CUDA graphs on a GPU); auto: only where it measures faster")
    p.add_argument("--limit-concurrency", type=int, default=64, help="most requests in progress at once; beyond, 503")
    p.add_argument("--header-timeout", type=float, default=5.0,
                   help="seconds a connection has to send a whole request head (after connecting or after a response)")
    p.add_argument("--max-connections", type=int, default=500,
                   help="most open connections (keep it below `ulimit -n`); past it the oldest idle one is closed")
    p.add_argument("--timeout-keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--docs", action="store_true",
                   help="serve /docs (Swagger UI, which loads its assets from a CDN) and /openapi.json, behind --api-key")
    for field, default in vars(Limits()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default, help=LIMIT_HELP[field])
    args = p.parse_args(argv)
    for origin in args.allow_origin:
        u = urlsplit(origin)
        if u.scheme not in ("http", "https") or not u.netloc or u.path not in ("", "/") or u.query:
            p.error(f"--allow-origin {origin!r} is not an origin: write scheme://host[:port], e.g. https://chat.example.com")
    device_type = args.device_type or autodetect_device_type()
    n = args.num_workers or (torch.cuda.device_count() if device_type == "cuda" else 1)
    if n < 1 or args.batch_slots < 1 or args.limit_concurrency < 1 or args.max_connections < 1:
        p.error("--num-workers, --batch-slots, --limit-concurrency and --max-connections must be >= 1")
    if not args.header_timeout > 0:
        p.error("--header-timeout must be > 0")
    workers = []
    for i in range(n):
        device = torch.device("cuda", i % torch.cuda.device_count()) if device_type == "cuda" else torch.device(device_type)
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        # the weight dtype is chosen (measured, for auto on a CPU) once, on the first replica
        model = serving_model(model, args.dtype if not workers else workers[0].engine.model.lm_head.weight.dtype,
                              device_type)
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, slots=args.batch_slots, compile=args.compile_decode,
                              max_n=args.max_n))
    limits = Limits(**{f: getattr(args, f) for f in vars(Limits())})
    origins = [f"http://{name}:{args.port}" for name in ("127.0.0.1", "localhost", "[::1]")] + args.allow_origin
    app = create_app(workers, limits, api_key=args.api_key, model_name=f"nanochat-{args.source}-step{meta['step']}",
                     origins=origins, docs=args.docs)
    print(f"nanochat chat server: http://{args.host}:{args.port}/  ({n} worker(s) x {args.batch_slots} slots, "
          f"{args.source} model step {meta['step']}; "
          f"serving {', '.join(origins)})", flush=True)
    uvicorn.run(RequestLimit(app, args.limit_concurrency), host=args.host, port=args.port, log_level="warning",
                http=guarded_http(args.header_timeout, args.max_connections), timeout_keep_alive=args.timeout_keep_alive)
    app.state.pool.close()  # the batch threads leave torch before the interpreter exits


if __name__ == "__main__":
    main()
