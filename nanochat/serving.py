"""
Serving one model to many clients, below the routes: the pool of workers (a model replica and its batch
scheduler each), each request's decode steps turned into text (UTF-8-safe, stop strings cut), the
mailbox that carries the scheduler threads' events into the event loop, and the weight dtype a replica
serves in. scripts/chat_web.py puts the routes in front; nothing here starts a server.

Every request goes one way. It waits for a seat (a batch slot of some worker) in a bounded queue for a
bounded time, else 503, always before a response starts. Its job then runs on that worker's scheduler
thread (batching.BatchScheduler: the requests in flight share each decode step, a new one joins at the
next), whose events reach the event loop through the mailbox, one wake-up per step whatever the number
of requests. A client that falls behind gets the text that is ready in one chunk; a client that goes
away cancels its job, and the seat comes back once the scheduler has let go of its slots. --batch-slots
1 is a pool of one slot per worker: one request at a time, through the same scheduler. In front of the
pool, two limits the server script puts around its app: requests in progress (RequestLimit) and open
connections that have not sent a request head in time (guarded_http).
"""

import asyncio
import copy
import logging
import os
import threading
import time
from collections import deque

import torch

from nanochat.batching import BatchScheduler
from nanochat.common import parse_dtype
from nanochat.engine import Utf8Stream
from nanochat.kv_cache import KVCache
from nanochat.openai_api import APIError, Limits, error_response

log = logging.getLogger("nanochat.serving")
INTERNAL_ERROR = "internal error while generating; the details are in the server log"


class Worker:
    """
    One model replica and its scheduler: up to `slots` requests share its decode steps. A worker of one slot
    still holds max_n rows, so that the one request it serves at a time may ask for up to max_n samples.
    """

    def __init__(self, index, engine, tokenizer, slots=1, compile="off", max_n=Limits.max_n):
        self.index, self.engine, self.tokenizer, self.slots = index, engine, tokenizer, slots
        self.scheduler = BatchScheduler(engine, slots if slots > 1 else max_n, compile=compile)


class WorkerPool:
    """
    The workers' free seats (one per batch slot) in an asyncio queue; at most `max_queue` requests wait for one.
    run(job) takes a seat and runs a job there (see run); the pool gives the seat back when the job is done.
    """

    def __init__(self, workers, max_queue, timeout):
        self.workers, self.max_queue, self.timeout = workers, max_queue, timeout
        self.seats = sum(w.slots for w in workers)
        self.free = self.mailbox = None  # made in the server's event loop
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

    async def run(self, job, disconnected):
        """
        Takes a seat (503 when none comes free in time) and starts job(worker, emit, done) on it. The job submits its
        work to worker.scheduler and returns what stops it (an object with cancel()); from the scheduler thread it
        calls emit('text', (row, piece)) any number of times, and once the scheduler has let go of it, done(error)
        and then (without an error) emit('end', info): the seat is back before the client has its answer. Returns the events as an async iterator that ends after 'end' or
        'error' (an internal error, logged here, reaches the client as a generic message) or once the awaitable
        disconnected() says the client has gone; however it ends, the job is cancelled.
        """
        worker = await self.acquire()
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = Mailbox(loop)
        post, queue = self.mailbox.post, asyncio.Queue()

        def emit(kind, payload):
            post(queue.put_nowait, (kind, payload))

        def done(error):
            post(self.release, worker)
            if error is not None:  # the traceback stays in the log; the client gets no internal text
                log.error("generation failed", exc_info=error)
                emit("error", INTERNAL_ERROR)
        try:
            handle = job(worker, emit, done)
        except BaseException as e:
            self.release(worker)
            if isinstance(e, ValueError):  # what the scheduler cannot take (n above its slots)
                raise APIError(400, str(e))
            raise
        return events(queue, handle.cancel, disconnected)

    def stats(self):
        free = self.free.qsize() if self.free is not None else self.seats
        return {"workers": len(self.workers), "slots": self.seats, "busy": self.seats - free, "free": free,
                "queued": self.waiting, "max_queue": self.max_queue, "served": self.served,
                "batch_steps": sum(w.scheduler.steps for w in self.workers)}

    def close(self):
        """Let the scheduler threads leave torch before the interpreter exits (the OpenMP runtime aborts otherwise)."""
        for w in self.workers:
            w.scheduler.close()


async def events(queue, cancel, disconnected):
    ahead = deque()
    try:
        while True:
            if not ahead:
                try:
                    ahead.append(await asyncio.wait_for(queue.get(), timeout=0.5) if queue.empty() else queue.get_nowait())
                except asyncio.TimeoutError:
                    if await disconnected():
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
        cancel()  # a disconnect (or any exit) stops the job; the scheduler frees its slots at its next step


async def result(events):
    """The 'end' payload of a job whose reply is not streamed."""
    async for kind, payload in events:
        if kind == "error":
            raise APIError(500, payload, "server_error")
        if kind == "end":
            return payload
    raise APIError(499, "client disconnected")


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


def reply_job(prompt, options):
    """
    The job (see WorkerPool.run) of a chat request: the reply generated on the worker's scheduler, its steps turned
    into text events on the scheduler thread (ReplyStream), every row cancelled once each has met a stop string.
    """
    def job(worker, emit, done):
        reply = ReplyStream(worker, prompt, options, emit)
        state = {}  # 'stopped' once every row has stopped early; it may come before submit returns

        def on_event(event):
            if event is None or isinstance(event, BaseException):
                done(event)
                return reply.end() if event is None else None
            if reply.push(event[0]):  # every row has stopped (a stop string): free the slots; the end follows
                state["stopped"] = True
                if "request" in state:
                    state["request"].cancel()

        state["request"] = request = worker.scheduler.submit(prompt, on_event=on_event, **sampling_options(options))
        if state.get("stopped"):
            request.cancel()
        return request
    return job


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


# -------------------------------------------------------------------------------------------------
# limits on HTTP requests and connections (scripts/chat_web.py puts them around its app and in uvicorn)

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


# -------------------------------------------------------------------------------------------------
# the weight dtype a replica serves in

def decode_seconds(model, rows=(1, 8), steps=2):
    """Seconds of `steps` single-token forwards at each row count after an 8-token prefix, on one thread (the
    batch scheduler's): what one decode step costs this replica."""
    c, device = model.config, model.get_device()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = 0.0
        with torch.inference_mode():
            for r in rows:
                cache = KVCache(r, c.n_kv_head, 8 + steps + 1, c.n_embd // c.n_head, c.n_layer)
                model(torch.zeros(r, 8, dtype=torch.long, device=device), kv_cache=cache)
                token = torch.zeros(r, 1, dtype=torch.long, device=device)
                model(token, kv_cache=cache)  # warm-up
                t0 = time.perf_counter()
                for _ in range(steps):
                    model(token, kv_cache=cache)
                total += time.perf_counter() - t0
        return total
    finally:
        torch.set_num_threads(threads)


def serving_model(model, name, device_type):
    """
    The replica in the weight dtype it serves in (name: --dtype, or a torch.dtype another replica was given).
    A replica only decodes, so when bf16 is chosen its weights are stored in bf16 (half the bytes read per
    token), not cast at every use as under autocast.
    auto: bf16 on CUDA; on a CPU, bf16 only where this model's decode step measures clearly faster in it
    (at start-up, on a bf16 copy: bf16 is emulated on many CPUs, and pays on others); fp32 otherwise.
    """
    if isinstance(name, torch.dtype):  # already chosen (another replica)
        return model.to(name)
    if name != "auto" or device_type != "cpu":
        return model.to(parse_dtype(name, device_type))
    t32 = decode_seconds(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    t16 = decode_seconds(bf16)
    use = t16 < 0.9 * t32
    print(f"nanochat chat server: decode weights in {'bf16' if use else 'fp32'} (a decode step measured "
          f"{t16 / t32:.2f}x as long in bf16 on this CPU)", flush=True)
    return bf16 if use else model
