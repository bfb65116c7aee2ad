"""
The web chat: a page, a streaming chat endpoint, and an OpenAI-compatible API, served by uvicorn.

    python -m scripts.chat_web                   # then open the printed URL
    python -m scripts.chat_web -i sft --num-workers 2 --port 8000 --api-key SECRET

Endpoints: GET / (the page), GET /health, GET /stats, POST /chat/completions (SSE token stream for
the page), POST /v1/chat/completions (OpenAI format, stream or not), POST /v1/completions (raw text
completion with prompt log-probabilities: lm-evaluation-harness's local-completions), GET /v1/models.

A pool of workers, one model replica each (one per GPU; one on CPU). A request waits for a free
worker in a bounded queue; when the queue is full the answer is 503 at once, never a hang.
Generation runs in a worker thread and streams tokens to the response; a client that disconnects
stops its generation and frees its worker. Every request is validated with a specific 4xx message.
top_p is nucleus sampling; `n` > 1 samples n rows from one prefill (non-streaming only); `stop`
strings end a reply and are cut from it; a leading `system` message is folded into the first user
turn (the model has no system role).
"""

import argparse
import asyncio
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from nanochat.engine import Engine, Utf8Stream
from nanochat.text_completion import complete


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
    max_prompts: int = 64  # /v1/completions: prompts per request
    max_prompt_tokens: int = 8192


class APIError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(e):
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.code}}, status_code=e.status)


class Worker:
    def __init__(self, index, engine, tokenizer, autocast=None):
        self.index, self.engine, self.tokenizer = index, engine, tokenizer
        from contextlib import nullcontext
        self.autocast = autocast or nullcontext()


class WorkerPool:
    """Free workers in an asyncio queue; at most `max_queue` requests may wait for one."""

    def __init__(self, workers, max_queue, timeout):
        self.workers, self.max_queue, self.timeout = workers, max_queue, timeout
        self.free = None  # created in the server's event loop
        self.waiting = 0
        self.served = 0

    async def acquire(self):
        if self.free is None:
            self.free = asyncio.Queue()
            for w in self.workers:
                self.free.put_nowait(w)
        if self.free.empty() and self.waiting >= self.max_queue:
            raise APIError(503, f"server busy: all {len(self.workers)} workers are generating and {self.waiting} "
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
        free = self.free.qsize() if self.free is not None else len(self.workers)
        return {"workers": len(self.workers), "busy": len(self.workers) - free, "free": free,
                "queued": self.waiting, "max_queue": self.max_queue, "served": self.served}


def body_number(body, name, default, lo, hi, kind=float):
    """body[name] as a number of `kind` within [lo, hi] (default when absent or null), else APIError(400)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}")
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}")
    return kind(value)


def body_stop(body):
    """body['stop'] as a list of at most 4 non-empty strings, else APIError(400)."""
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings")
    return stop


def validate(body, limits, openai):
    """-> (messages, options) or raises APIError(400/422) with the specific reason."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} > {limits.max_messages}")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise APIError(400, f"message {i} must be an object with a string 'content'")
        if m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"message {i} has unknown role {m.get('role')!r}; use system, user or assistant")
        if m["role"] == "system" and i != 0:
            raise APIError(400, "a system message may only come first")
        if len(m["content"]) > limits.max_message_chars:
            raise APIError(400, f"message {i} is {len(m['content'])} characters; the limit is {limits.max_message_chars}")
        total += len(m["content"])
    if total > limits.max_total_chars:
        raise APIError(400, f"the conversation is {total} characters; the limit is {limits.max_total_chars}")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user")

    options = {
        "temperature": body_number(body, "temperature", 0.6 if not openai else 1.0, 0.0, 2.0),
        "top_k": body_number(body, "top_k", 50, 0, limits.max_top_k, int),
        "top_p": body_number(body, "top_p", 1.0, 1e-6, 1.0),
        "max_tokens": body_number(body, "max_tokens", 512, 1, limits.max_tokens, int),
        "n": body_number(body, "n", 1, 1, limits.max_n, int),
        "seed": body_number(body, "seed", None, 0, 2**31 - 1, int),
    }
    options["stop"] = body_stop(body)
    options["stream"] = bool(body.get("stream", False))
    if options["stream"] and options["n"] > 1:
        raise APIError(400, "streaming supports n = 1 only")
    return messages, options


def validate_completion(body, limits, vocab_size):
    """/v1/completions -> (prompts, options): prompts as str or lists of token ids; APIError(400) otherwise."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    is_ids = lambda x: isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)  # noqa: E731
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or is_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"too many prompts: {len(prompts)} > {limits.max_prompts}")
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p or len(p) > limits.max_total_chars:
                raise APIError(400, f"prompt {i} must have 1 to {limits.max_total_chars} characters")
        else:
            if len(p) > limits.max_prompt_tokens:
                raise APIError(400, f"prompt {i} has {len(p)} tokens; the limit is {limits.max_prompt_tokens}")
            bad = next((t for t in p if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt {i} has token id {bad}, outside the vocabulary [0, {vocab_size})")
    options = {name: body_number(body, name, default, lo, hi, kind) for name, default, lo, hi, kind in (
        ("max_tokens", 16, 0, limits.max_tokens, int), ("temperature", 1.0, 0.0, 2.0, float),
        ("top_p", 1.0, 1e-6, 1.0, float), ("seed", None, 0, 2**31 - 1, int), ("logprobs", None, 0, 20, int),
        ("n", 1, 1, 1, int))}
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise APIError(400, "'echo' must be true or false")
    options["echo"] = echo
    if body.get("stream"):
        raise APIError(400, "streaming is not supported on /v1/completions; use /v1/chat/completions")
    options["stop"] = body_stop(body)
    return prompts, options


def generate_in_thread(worker, messages, options, emit, stop_event):
    """Runs in a worker thread: emit(kind, payload) for 'text', then once 'end' (finish_reason, counts)."""
    tok = worker.tokenizer
    try:
        prompt = tok.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    except ValueError as e:
        emit("error", str(e))
        return
    seed = options["seed"] if options["seed"] is not None else int.from_bytes(os.urandom(4), "little")
    n = options["n"]
    streams = [Utf8Stream(tok) for _ in range(n)]
    texts = [""] * n
    finished = [None] * n
    completion_tokens = 0
    with worker.autocast:
        for column, _ in worker.engine.generate(prompt, num_samples=n, max_tokens=options["max_tokens"],
                                                temperature=options["temperature"], top_k=options["top_k"] or None,
                                                top_p=options["top_p"], seed=seed):
            if stop_event.is_set():
                break
            for i, token in enumerate(column):
                if token is None or finished[i]:
                    continue
                completion_tokens += 1
                if token in worker.engine.stop_ids:
                    finished[i] = "stop"
                    continue
                piece = streams[i].push(token)
                texts[i] += piece
                hit = next((s for s in options["stop"] if s in texts[i]), None)
                if hit:
                    cut = texts[i].index(hit)
                    piece = piece[:max(0, len(piece) - (len(texts[i]) - cut))]
                    texts[i] = texts[i][:cut]
                    finished[i] = "stop"
                if piece:
                    emit("text", (i, piece))
            if all(finished):
                break
    for i in range(n):
        if not finished[i]:
            tail = streams[i].flush()
            if tail:
                texts[i] += tail
                emit("text", (i, tail))
    emit("end", {"texts": texts, "finish": [f or "length" for f in finished],
                 "prompt_tokens": len(prompt), "completion_tokens": completion_tokens})


def create_app(workers, limits=None, api_key=None, model_name="nanochat"):
    limits = limits or Limits()
    pool = WorkerPool(workers, limits.max_queue, limits.queue_timeout)
    app = FastAPI(title="nanochat")
    app.state.pool = pool
    ui_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanochat", "ui.html")

    def check_key(request):
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           "invalid_api_key")

    async def parse(request, openai):
        check_key(request)
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise APIError(400, f"malformed JSON: {e}")
        return validate(body, limits, openai)

    async def run(request, messages, options):
        """Yields ('text', (row, piece)) ... then ('end', info); frees the worker however it ends."""
        worker = await pool.acquire()
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        stop_event = threading.Event()

        def emit(kind, payload):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, payload))

        def target():
            try:
                generate_in_thread(worker, messages, options, emit, stop_event)
            except Exception as e:  # never leave the client hanging
                emit("error", f"{type(e).__name__}: {e}")
            finally:
                loop.call_soon_threadsafe(pool.release, worker)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield kind, payload
                if kind in ("end", "error"):
                    return
        finally:
            stop_event.set()  # a disconnect (or any exit) stops the generation; the thread frees the worker

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return error_response(e)

    @app.get("/")
    async def index():
        with open(ui_path, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", "workers": len(workers)}

    @app.get("/stats")
    async def stats():
        return pool.stats()

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "nanochat"}]}

    @app.post("/chat/completions")
    async def chat(request: Request):
        messages, options = await parse(request, openai=False)
        options["stream"] = True

        async def events():
            async for kind, payload in run(request, messages, options):
                if kind == "text":
                    yield f"data: {json.dumps({'token': payload[1]})}\n\n"
                elif kind == "error":
                    yield f"data: {json.dumps({'error': payload})}\n\n"
                else:
                    yield f"data: {json.dumps({'done': True, 'finish_reason': payload['finish'][0]})}\n\n"

        pool_full_check(pool)
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        messages, options = await parse(request, openai=True)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        pool_full_check(pool)
        if options["stream"]:
            async def events():
                def chunk(delta, finish=None):
                    return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                                  "model": model_name, "choices": [{"index": 0, "delta": delta,
                                                                                    "finish_reason": finish}]}) + "\n\n"
                yield chunk({"role": "assistant", "content": ""})
                async for kind, payload in run(request, messages, options):
                    if kind == "text":
                        yield chunk({"content": payload[1]})
                    elif kind == "error":
                        yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
                    else:
                        yield chunk({}, payload["finish"][0])
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        info = None
        async for kind, payload in run(request, messages, options):
            if kind == "error":
                raise APIError(400, payload)
            if kind == "end":
                info = payload
        if info is None:
            raise APIError(499, "client disconnected")
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                            for i, (text, finish) in enumerate(zip(info["texts"], info["finish"]))],
                "usage": {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                          "total_tokens": info["prompt_tokens"] + info["completion_tokens"]}}

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        check_key(request)
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise APIError(400, f"malformed JSON: {e}")
        prompts, options = validate_completion(body, limits, workers[0].tokenizer.get_vocab_size())
        pool_full_check(pool)
        worker = await pool.acquire()
        try:
            def work():
                tok, seed = worker.tokenizer, options["seed"] if options["seed"] is not None else 0
                return [complete(worker.engine, tok, tok.encode(p) if isinstance(p, str) else list(p),
                                 options["max_tokens"], options["temperature"], options["top_p"], seed + i,
                                 options["logprobs"], options["echo"], options["stop"], worker.autocast)
                        for i, p in enumerate(prompts)]
            choices = await asyncio.to_thread(work)
        finally:
            pool.release(worker)
        prompt_tokens = sum(c.pop("prompt_tokens") for c in choices)
        completion_tokens = sum(c.pop("completion_tokens") for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model_name, "choices": [dict(c, index=i) for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def pool_full_check(pool):
    """Refuse before the response starts (a streaming response can no longer change its status)."""
    free = pool.free.qsize() if pool.free is not None else len(pool.workers)
    if free == 0 and pool.waiting >= pool.max_queue:
        raise APIError(503, f"server busy: all {len(pool.workers)} workers are generating and {pool.waiting} "
                            f"requests are queued; retry shortly", "server_busy", "queue_full")


def main(argv=None):
    import torch
    import uvicorn
    from nanochat.checkpoint import add_checkpoint_args, load_model
    from nanochat.common import autocast_ctx, autodetect_device_type, parse_dtype
    p = argparse.ArgumentParser(description="Serve a chat model: web page + OpenAI-compatible API.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="sft")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 to expose it)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--num-workers", type=int, default=None, help="model replicas (default: one per GPU, one on CPU)")
    p.add_argument("--api-key", default=os.environ.get("NANOCHAT_API_KEY"), help="require 'Authorization: Bearer KEY'")
    for field, default in vars(Limits()).items():
        p.add_argument(f"--{field.replace('_', '-')}", type=type(default), default=default, help="request limit")
    args = p.parse_args(argv)
    device_type = args.device_type or autodetect_device_type()
    n = args.num_workers or (torch.cuda.device_count() if device_type == "cuda" else 1)
    if n < 1:
        p.error("--num-workers must be >= 1")
    workers = []
    for i in range(n):
        device = torch.device("cuda", i % torch.cuda.device_count()) if device_type == "cuda" else torch.device(device_type)
        try:
            model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}")
        workers.append(Worker(i, Engine(model, tokenizer), tokenizer, autocast_ctx(device_type, parse_dtype(args.dtype, device_type))))
    limits = Limits(**{f: getattr(args, f) for f in vars(Limits())})
    app = create_app(workers, limits, api_key=args.api_key, model_name=f"nanochat-{args.source}-step{meta['step']}")
    print(f"nanochat chat server: http://{args.host}:{args.port}/  ({n} worker(s), {args.source} model step {meta['step']})",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
