"""
The web chat: a page, a streaming chat endpoint, and an OpenAI-compatible API, served by uvicorn.

    python -m scripts.chat_web                   # then open the printed URL
    python -m scripts.chat_web -i sft --num-workers 2 --port 8000 --api-key SECRET

Endpoints: GET / (the page), GET /health, GET /stats, POST /chat/completions (SSE token stream for
the page), POST /v1/chat/completions (OpenAI format, stream or not), POST /v1/completions (raw text
completion with prompt log-probabilities: lm-evaluation-harness's local-completions), GET /v1/models.

A pool of workers, one model replica each (one per GPU; one on CPU), each serving up to
--batch-slots requests at once by continuous batching (engine.BatchScheduler: the active requests
share one decode step; a new one joins at the next step; --batch-slots 1 serves one request at a
time). A request waits for a free slot in a bounded queue; when the queue is full, or no slot comes
free in time, the answer is 503 — always before a streaming response starts, never a hang.
With batching, the scheduler's thread turns each decode step into text for every request and hands
it to the event loop in one wake-up; with one request at a time, a thread per request drives the
Engine. A client that falls behind gets the text that is ready in one chunk; a client that
disconnects stops its generation and frees its slot. Every request is validated with a specific 4xx message, in tokens where the model counts in
tokens: prompt + max_tokens must fit the model's context. top_p is nucleus sampling; `n` > 1
samples n rows from one prefill (non-streaming only); `stop` strings end a reply and are cut from
it; a leading `system` message is folded into the first user turn (the model has no system role).
A temperature below 1e-4 (sampling.MIN_TEMPERATURE) is greedy, as 0 is: it could not change a token.

Hostile clients. Any web page can POST to 127.0.0.1, so: POST bodies must be application/json (a
page can send text/plain without asking; JSON needs a CORS preflight, which we never grant), the
Host header must be one of ours (DNS rebinding) and an Origin header, when sent, must be allowed
(loopback with our port, plus --allow-origin). Bodies are counted while they are read: past
--max-body-bytes the answer is 413, a body slower than --body-timeout gets 408, both before a worker
is taken. A connection that has not sent a whole request head within --header-timeout seconds
(of connecting, or of its last response) is closed: connections that send nothing, or a byte now and
then, cannot pile up (uvicorn's keep-alive timer starts only after a first response). At most
--limit-concurrency requests are handled at once (503 beyond), counted in requests, not in
connections, so idle connections take no one's place; past --max-connections the oldest connection
still waiting for its head makes room. Error messages quote user values only as short prefixes.
/docs and /openapi.json exist only with --docs (behind the API key when one is set). An internal
error is logged with its traceback and answered with a generic 500.
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from contextlib import closing, nullcontext
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from nanochat.common import limit_side_thread
from nanochat.engine import BatchScheduler, Engine, Utf8Stream
from nanochat.openai_api import APIError, error_response, read_json, validate, validate_completion
from nanochat.serving import serving_model
from nanochat.text_completion import complete

log = logging.getLogger("nanochat.chat_web")
INTERNAL_ERROR = "internal error while generating; the details are in the server log"


@dataclass
class Limits:
    max_messages: int = 64
    max_message_chars: int = 8000
    max_total_chars: int = 32000
    max_tokens: int = 2048
    max_top_k: int = 1000
    max_n: int = 8
    max_queue: int = 16
    queue_timeout: float = 60.0
    max_prompts: int = 64
    max_prompt_tokens: int = 8192
    max_body_bytes: int = 1_000_000
    body_timeout: float = 10.0


LIMIT_HELP = {
    "max_messages": "most messages in one conversation", "max_message_chars": "most characters in one message",
    "max_total_chars": "most characters in a conversation or a /v1/completions prompt",
    "max_tokens": "highest max_tokens a request may ask for (prompt + max_tokens must also fit the model's context)",
    "max_top_k": "highest top_k", "max_n": "highest n (samples per request)",
    "max_queue": "requests that may wait for a busy worker; more get 503 at once",
    "queue_timeout": "seconds a request waits for a worker before 503",
    "max_prompts": "/v1/completions: most prompts per request", "max_prompt_tokens": "/v1/completions: most tokens per prompt",
    "max_body_bytes": "largest request body; a larger one gets 413 while it is read (chunked bodies too)",
    "body_timeout": "seconds a client has to send its whole request body; a slower one gets 408",
}


class Cancelled(Exception):
    """The client went away: generation stops early."""


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


class RequestLimit:
    """ASGI wrapper: at most `limit` HTTP requests in progress at once (a streamed reply counts until it ends); more
    get 503 at once. Counted in requests, unlike uvicorn's limit, which counts idle connections too."""

    def __init__(self, app, limit):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            busy = APIError(503, f"server busy: {self.limit} requests are in progress (--limit-concurrency); retry shortly",
                            "server_busy", "too_many_requests")
            return await error_response(busy)(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


def guarded_http(header_timeout, max_connections):
    """
    uvicorn's HTTP protocol with two guards it lacks: a connection must send a whole request head within
    header_timeout seconds of connecting (or of its last response), else it is closed; and past max_connections
    the oldest connection still waiting for a head is closed to make room (if every connection is busy with a
    request, the new one is). Both protocols uvicorn can pick (h11, httptools) start a new `cycle` per request head.
    """
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTP(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.head_timer = None
            self.await_head()
            if len(self.connections) > max_connections:
                waiting = [c for c in self.connections if getattr(c, "head_timer", None) is not None and c.cycle is c.head_cycle]
                oldest = min(waiting, key=lambda c: c.waiting_since)  # this one at least is waiting
                oldest.transport.close()

        def await_head(self):
            """From now on the next request head must arrive within header_timeout."""
            if self.head_timer is not None:
                self.head_timer.cancel()
            self.head_cycle, self.waiting_since = self.cycle, self.loop.time()
            self.head_timer = self.loop.call_later(header_timeout, self.head_overdue)

        def head_overdue(self):
            if self.cycle is self.head_cycle and not self.transport.is_closing():  # no request head since
                self.transport.close()

        def on_response_complete(self):
            self.await_head()  # before: the next (pipelined) request may start inside
            super().on_response_complete()

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

    return GuardedHTTP


class Worker:
    """
    One model replica. slots > 1: continuous batching (engine.BatchScheduler): up to `slots` requests
    share its decode steps; slots == 1: one request at a time through the Engine (the old mode).
    """

    def __init__(self, index, engine, tokenizer, slots=1, compile="off"):
        self.index, self.engine, self.tokenizer = index, engine, tokenizer
        self.slots = slots
        self.scheduler = BatchScheduler(engine, slots, compile=compile) if slots > 1 else None

    @property
    def generator(self):
        """What generates: the shared batch, or the engine itself (same interface)."""
        return self.scheduler or self.engine


class CancellableEngine:
    """A worker's engine for text_completion.complete(): generation raises Cancelled once stop_event is set."""

    def __init__(self, worker, stop_event):
        self.worker, self.stop_event = worker, stop_event
        self.model, self.stop_ids = worker.engine.model, worker.engine.stop_ids

    def generate(self, *args, **kwargs):
        steps = self.worker.generator.generate(*args, **kwargs)
        try:
            for step in steps:
                if self.stop_event.is_set():
                    raise Cancelled()
                yield step
        finally:
            steps.close()  # frees a batch slot at once

    generate_batch = Engine.generate_batch  # the same bookkeeping, over our generate


class WorkerPool:
    """Free seats in an asyncio queue (a worker has one seat per batch slot); at most `max_queue` requests may wait."""

    def __init__(self, workers, max_queue, timeout):
        self.workers, self.max_queue, self.timeout = workers, max_queue, timeout
        self.seats = sum(w.slots for w in workers)
        self.free = None  # created in the server's event loop
        self.waiting = 0
        self.served = 0

    async def acquire(self):
        if self.free is None:
            self.free = asyncio.Queue()
            for w in self.workers:
                for _ in range(w.slots):
                    self.free.put_nowait(w)
        if self.free.empty() and self.waiting >= self.max_queue:
            raise APIError(503, f"server busy: all {self.seats} generation slots are taken and {self.waiting} "
                                f"requests are queued; retry shortly", "server_busy", "queue_full")
        self.waiting += 1
        try:
            return await asyncio.wait_for(self.free.get(), timeout=self.timeout)
        except asyncio.TimeoutError:
            raise APIError(503, f"no worker became free within {self.timeout:.0f}s; retry shortly", "server_busy", "timeout")
        finally:
            self.waiting -= 1

    def release(self, worker):
        self.served += 1
        self.free.put_nowait(worker)

    def stats(self):
        free = self.free.qsize() if self.free is not None else self.seats
        return {"workers": len(self.workers), "slots": self.seats, "busy": self.seats - free, "free": free,
                "queued": self.waiting, "max_queue": self.max_queue, "served": self.served,
                "batch_steps": sum(w.scheduler.steps for w in self.workers if w.scheduler)}


class ReplyStream:
    """
    Generated columns -> text events: emit('text', (row, piece)) with UTF-8-safe pieces, `stop` strings
    cut, then once emit('end', {texts, finish, prompt_tokens, completion_tokens}).
    """

    def __init__(self, worker, prompt, options, emit):
        self.tok, self.stop_ids, self.emit = worker.tokenizer, worker.engine.stop_ids, emit
        self.stop_strings, self.prompt_tokens = options["stop"], len(prompt)
        n = options["n"]
        self.streams = [Utf8Stream(self.tok) for _ in range(n)]
        self.texts, self.finished, self.completion_tokens = [""] * n, [None] * n, 0
        self.sent = [0] * n  # characters of each text already emitted
        self.longest_stop = max((len(s) for s in self.stop_strings), default=0)

    def push(self, column):
        """One step's tokens (None for a finished row). Returns True once every row has finished."""
        for i, token in enumerate(column):
            if token is None or self.finished[i]:
                continue
            self.completion_tokens += 1
            if token in self.stop_ids:
                self.finished[i] = "stop"
                continue
            piece = self.streams[i].push(token)
            if not piece:
                continue
            text = self.texts[i] + piece
            # a stop string may end in this piece and start before it: search from where it could start
            start = max(0, len(self.texts[i]) - self.longest_stop + 1)
            hits = [text.find(s, start) for s in self.stop_strings]
            hits = [h for h in hits if h >= 0]
            if hits:
                text, self.finished[i] = text[:min(hits)], "stop"
                ready = len(text)
            else:  # hold back a tail that could still grow into a stop string
                held = max((next((k for k in range(len(s) - 1, 0, -1) if text.endswith(s[:k])), 0)
                            for s in self.stop_strings), default=0)
                ready = len(text) - held
            self.texts[i] = text
            self._send(i, ready)
        return all(self.finished)

    def _send(self, i, upto):
        if upto > self.sent[i]:
            self.emit("text", (i, self.texts[i][self.sent[i]:upto]))
            self.sent[i] = upto

    def end(self):
        for i, stream in enumerate(self.streams):
            if not self.finished[i]:
                self.texts[i] += stream.flush()
            self._send(i, len(self.texts[i]))  # what was held back for a stop string that never came
        self.emit("end", {"texts": self.texts, "finish": [f or "length" for f in self.finished],
                          "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens})


def sampling_options(options):
    seed = options["seed"] if options["seed"] is not None else int.from_bytes(os.urandom(4), "little")
    return dict(num_samples=options["n"], max_tokens=options["max_tokens"], temperature=options["temperature"],
                top_k=options["top_k"] or None, top_p=options["top_p"], seed=seed)


def generate_in_thread(worker, prompt, options, emit, stop_event):
    """One request at a time (the Engine, in a worker thread): emit 'text' events, then once 'end'."""
    reply = ReplyStream(worker, prompt, options, emit)
    steps = worker.generator.generate(prompt, **sampling_options(options))
    with closing(steps):  # closing: a stop or disconnect frees a batch slot at once
        for column, _ in steps:
            if stop_event.is_set() or reply.push(column):
                break
    reply.end()


def generate_on_scheduler(worker, prompt, options, emit, done):
    """
    Continuous batching without a thread per request: the scheduler thread turns each step into text events
    (ReplyStream) and calls done(error) once at the end. Returns the engine Request
    (cancel() it to stop).
    """
    reply = ReplyStream(worker, prompt, options, emit)
    state = {}  # 'request' once submit returns; 'stopped' once every row has stopped (either may come first)

    def on_event(event):
        if state.get("ended"):
            return
        if event is None or isinstance(event, BaseException):
            state["ended"] = True
            if event is None:
                reply.end()
            return done(event)
        if reply.push(event[0]):  # every row has stopped (a stop string): free the slots; the end follows
            state["stopped"] = True
            if "request" in state:
                state["request"].cancel()

    state["request"] = request = worker.scheduler.submit(prompt, on_event=on_event, **sampling_options(options))
    if state.get("stopped"):  # it stopped before submit returned
        request.cancel()
    return request


class Mailbox:
    """Calls from other threads into the event loop, waking it once per burst (a decode step hands out one event
    per request) instead of once per call."""

    def __init__(self, loop):
        self.loop, self.calls, self.lock, self.waking = loop, [], threading.Lock(), False

    def post(self, fn, *args):
        with self.lock:
            self.calls.append((fn, args))
            if self.waking:
                return
            self.waking = True
        self.loop.call_soon_threadsafe(self._run)

    def _run(self):
        with self.lock:
            calls, self.calls, self.waking = self.calls, [], False
        for fn, args in calls:
            fn(*args)


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
    mailbox = [None]  # made in the server's event loop

    def check_key(request):
        given = request.headers.get("authorization", "").encode("latin-1")  # starlette decoded it as latin-1
        if expected_key is not None and not hmac.compare_digest(given, expected_key):  # constant time
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")

    async def parse(request, openai):
        check_key(request)
        return validate(await read_json(request, limits), limits, openai, tokenizer, context)

    async def start(request, job):
        """
        Takes a worker (503 when none comes free in time: before any response starts), runs job(worker, emit,
        stop_event) in a thread, and returns its events: ('text', (row, piece)) ... then ('end', info) or
        ('error', message). The thread frees the worker however it ends; a client that goes away stops it.
        """
        worker = await pool.acquire()
        loop = asyncio.get_running_loop()
        if mailbox[0] is None or mailbox[0].loop is not loop:
            mailbox[0] = Mailbox(loop)
        post = mailbox[0].post
        queue = asyncio.Queue()
        stop_event = threading.Event()

        def emit(kind, payload):
            post(queue.put_nowait, (kind, payload))

        def target():
            limit_side_thread(worker.engine.model.get_device())
            try:
                job(worker, emit, stop_event)
            except Cancelled:
                pass
            except Exception:  # the traceback stays here; the client gets no internal text
                log.exception("generation failed")
                emit("error", INTERNAL_ERROR)
            finally:
                loop.call_soon_threadsafe(pool.release, worker)

        on_scheduler = getattr(job, "on_scheduler", None)
        if worker.scheduler is not None and on_scheduler is not None:
            def done(error):
                if error is not None:
                    log.error("generation failed", exc_info=error)
                    emit("error", INTERNAL_ERROR)
                post(pool.release, worker)
            try:
                handle = on_scheduler(worker, emit, done)
            except BaseException as e:
                pool.release(worker)
                if isinstance(e, ValueError):  # what the scheduler cannot take (n above its slots)
                    raise APIError(400, str(e))
                raise
            stop = handle.cancel  # the scheduler frees the slots at its next step, then calls done
        else:
            threading.Thread(target=target, daemon=True).start()
            stop = stop_event.set  # the thread frees the worker

        async def events():
            ahead = deque()
            try:
                while True:
                    if not ahead:
                        try:
                            ahead.append(await asyncio.wait_for(queue.get(), timeout=0.5) if queue.empty()
                                         else queue.get_nowait())
                        except asyncio.TimeoutError:
                            if await request.is_disconnected():
                                return
                            continue
                        while not queue.empty():
                            ahead.append(queue.get_nowait())
                    kind, payload = ahead.popleft()
                    if kind == "text":  # a client that fell behind gets what is ready in one piece, not a chunk per token
                        row, piece = payload
                        while ahead and ahead[0][0] == "text" and ahead[0][1][0] == row:
                            piece += ahead.popleft()[1][1]
                        payload = (row, piece)
                    yield kind, payload
                    if kind in ("end", "error"):
                        return
            finally:
                stop()  # a disconnect (or any exit) stops the generation
        return events()

    async def result(events):
        """The 'end' payload of a non-streaming job."""
        async for kind, payload in events:
            if kind == "error":
                raise APIError(500, payload, "server_error")
            if kind == "end":
                return payload
        raise APIError(499, "client disconnected")

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

    def chat_job(prompt, options):
        def job(worker, emit, stop_event):
            generate_in_thread(worker, prompt, options, emit, stop_event)
        job.on_scheduler = lambda worker, emit, done: generate_on_scheduler(worker, prompt, options, emit, done)
        return job

    @app.post("/chat/completions")
    async def chat(request: Request):
        prompt, options = await parse(request, openai=False)
        events = await start(request, chat_job(prompt, options))

        async def sse():
            async for kind, payload in events:
                if kind == "text":
                    yield f"data: {json.dumps({'token': payload[1]})}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': payload})}\n\n"
                else:
                    yield f"data: {json.dumps({'done': True, 'finish_reason': payload['finish'][0]})}\n\n"
        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        prompt, options = await parse(request, openai=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        events = await start(request, chat_job(prompt, options))
        if options["stream"]:
            async def sse():
                def chunk(delta, finish=None):
                    return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                                  "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                                    "finish_reason": finish}]}) + "\n\n"
                yield chunk({"role": "assistant", "content": ""})
                async for kind, payload in events:
                    if kind == "text":
                        yield chunk({"content": payload[1]})
                    elif kind == "error":
                        yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
                    else:
                        yield chunk({}, payload["finish"][0])
                        if options.get("include_usage"):
                            usage = {"prompt_tokens": payload["prompt_tokens"], "completion_tokens": payload["completion_tokens"],
                                     "total_tokens": payload["prompt_tokens"] + payload["completion_tokens"]}
                            yield "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                                         "model": model_name, "choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")
        info = await result(events)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                            for i, (text, finish) in enumerate(zip(info["texts"], info["finish"]))],
                "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                          "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}}

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        check_key(request)
        prompts, options = validate_completion(await read_json(request, limits), limits, tokenizer, context)

        def job(worker, emit, stop_event):
            engine, tok = CancellableEngine(worker, stop_event), worker.tokenizer
            seed, choices = options["seed"] if options["seed"] is not None else 0, []
            for i, p in enumerate(prompts):
                if stop_event.is_set():
                    raise Cancelled()
                choices.append(complete(engine, tok, p, options["max_tokens"], options["temperature"], options["top_p"],
                                        seed + i, options["logprobs"], options["echo"], options["stop"], nullcontext()))
            emit("end", choices)
        choices = await result(await start(request, job))
        prompt_tokens = sum(c.pop("prompt_tokens") for c in choices)
        completion_tokens = sum(c.pop("completion_tokens") for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [dict(c, index=i) for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

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
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, slots=args.batch_slots, compile=args.compile_decode))
    limits = Limits(**{f: getattr(args, f) for f in vars(Limits())})
    origins = [f"http://{name}:{args.port}" for name in ("127.0.0.1", "localhost", "[::1]")] + args.allow_origin
    app = create_app(workers, limits, api_key=args.api_key, model_name=f"nanochat-{args.source}-step{meta['step']}",
                     origins=origins, docs=args.docs)
    print(f"nanochat chat server: http://{args.host}:{args.port}/  ({n} worker(s) x {args.batch_slots} slots, "
          f"{args.source} model step {meta['step']}; "
          f"serving {', '.join(origins)})", flush=True)
    uvicorn.run(RequestLimit(app, args.limit_concurrency), host=args.host, port=args.port, log_level="warning",
                http=guarded_http(args.header_timeout, args.max_connections), timeout_keep_alive=args.timeout_keep_alive)
    for worker in workers:  # let the batch threads leave torch before the interpreter exits
        if worker.scheduler is not None:
            worker.scheduler.close()


if __name__ == "__main__":
    main()
