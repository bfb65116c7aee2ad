"""
Continuous batching: many requests share one decode step over a fixed pool of cache slots (a SlotCache),
on one scheduler thread per model replica. A request is prefilled alone (Engine.prefill) and joins at the
next step; a finished or cancelled one leaves its slots at once. Each request gets the tokens it would get
from Engine.generate alone: the per-row work has the same shapes whatever else is in the batch, every row
samples from its own seeded stream, and tool use runs through the Engine's own state machine.

    scheduler = BatchScheduler(engine, slots=16)
    for column, forced in scheduler.generate(prompt_ids, max_tokens=256, temperature=0.8, seed=1):
        ...  # as Engine.generate
    request = scheduler.submit(prompt_ids, on_event=callback)  # or: events on the scheduler thread
    scheduler.call(fn, on_event=callback)  # fn() on the scheduler thread, between two steps

The scheduler knows nothing of HTTP: nanochat/serving.py puts a pool of them behind the web server.
"""

import queue
import threading
import time
from collections import deque
from contextlib import nullcontext

import torch

from nanochat.common import limit_side_thread
from nanochat.engine import RowState
from nanochat.kv_cache import SlotCache
from nanochat.sampling import row_rngs, sample_next


class Request:
    """
    One submitted prompt (num_samples rows), or one call (no rows: its one event is the call's result).
    Iterating yields (column, forced) like Engine.generate. With
    on_event, the scheduler thread instead calls on_event((column, forced)) for every step, then
    on_event(None) at the end or on_event(exception) on a failure; it must be quick (it runs between
    decode steps) and must not block. Cancel when no longer interested.
    """

    def __init__(self, tokens, num_samples, max_tokens, sampling, seed, tools, on_event=None, fn=None):
        self.tokens, self.num_samples, self.max_tokens = tokens, num_samples, max_tokens
        self.fn = fn  # a call (BatchScheduler.call): no rows, one event (fn's result)
        self.sampling, self.tools = sampling, tools  # sampling: (temperature, top_k, top_p)
        self.rows = [RowState() for _ in range(num_samples)]
        self.rngs = row_rngs(seed, num_samples)
        self.slots, self.emitted = [], 0
        self.events = queue.Queue() if on_event is None else None
        self.on_event = on_event
        self.cancelled = self.ended = False

    def deliver(self, event):
        """Hands one event to the consumer. A step the consumer cannot take (on_event raised) raises here: the
        scheduler then ends this request alone, with that error. The last event is delivered once."""
        if self.ended:
            return
        self.ended = event is None or isinstance(event, BaseException)
        if self.on_event is None:
            return self.events.put(event)
        try:
            self.on_event(event)
        except Exception as e:
            if not self.ended:
                raise
            print(f"nanochat.batching: a request's last on_event failed ({type(e).__name__}: {e})")

    def cancel(self):
        """Stop generating (a client went away): the slots are freed at the next step."""
        self.cancelled = True

    def __iter__(self):
        if self.events is None:
            raise TypeError("a request submitted with on_event is not iterable")
        try:
            while True:
                event = self.events.get()
                if event is None:
                    return
                if isinstance(event, BaseException):
                    raise event
                yield event
        finally:  # the consumer stopped early (a disconnect, a stop string): free the slots
            self.cancel()


class BatchScheduler:
    """
    Continuous batching over one model: active requests share one decode step over a SlotCache of
    `slots` rows; a new request is prefilled (alone, eager) and joins at the next step; a finished or
    cancelled request leaves its slots at once. Per-request temperature/top_k/top_p/seed/max_tokens and
    tool use work as in Engine.generate, and since every row's computation has the same shapes whatever
    else is in the batch, a request's tokens do not depend on its neighbours (seeded sampling included).
    compile: torch.compile the decode step (CUDA graphs on a GPU); "auto": on CUDA only, and kept only if
    a quick measurement shows it faster; eager otherwise, and whenever compiling fails.
    """

    def __init__(self, engine, slots=8, max_len=None, autocast=None, compile="off"):
        self.engine, self.model = engine, engine.model
        c = self.model.config
        self.max_len = max_len or c.sequence_len
        self.device = self.model.get_device()
        self.cache = SlotCache(slots, c.n_kv_head, self.max_len, c.n_embd // c.n_head, c.n_layer, self.device)
        # per slot, on the host: the Request holding it, its cached positions and the token it feeds next;
        # the device copies (cache.lengths, feed) are written from these once per step
        self.owner = [None] * slots
        self.length = [0] * slots
        self.next_input = [0] * slots
        self.rng = [None] * slots  # the random stream of the request row in the slot
        self.feed = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.pending = deque()
        self.cond = threading.Condition()
        self.autocast = autocast or nullcontext()
        if compile not in ("off", "on", "auto"):
            raise ValueError(f"compile must be off, on or auto, got {compile!r}")
        if compile == "auto" and self.device.type != "cuda":
            compile = "off"  # on a CPU each (rows, span) shape costs seconds of compiling for little gain (bench.inference)
        self.compile_mode, self.compiled, self.thread = compile, None, None
        self.steps = 0
        self.closing = False

    @property
    def slots(self):
        return len(self.owner)

    def free_slots(self):
        return sum(o is None for o in self.owner)

    def submit(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, top_p=None, seed=42, tools=True,
               on_event=None):
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
            raise ValueError("submit takes a non-empty list of int token ids")
        if not 1 <= num_samples <= self.slots:
            raise ValueError(f"num_samples must be between 1 and the {self.slots} slots, got {num_samples}")
        if len(tokens) >= self.max_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens; the cache holds {self.max_len}")
        budget = self.max_len - len(tokens) if max_tokens is None else min(max_tokens, self.max_len - len(tokens))
        if temperature is None or temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        return self._enqueue(Request(tokens, num_samples, budget, (temperature, top_k, top_p), seed, tools, on_event))

    def _enqueue(self, request):
        with self.cond:
            if self.thread is None or not self.thread.is_alive():
                self.closing = False
                self.thread = threading.Thread(target=self._loop, name="nanochat-batch", daemon=True)
                self.thread.start()
            self.pending.append(request)
            self.cond.notify()
        return request

    def generate(self, tokens, **kwargs):
        """Engine.generate's interface, served by the shared batch."""
        return iter(self.submit(tokens, **kwargs))

    def call(self, fn, on_event=None):
        """
        Runs fn() on the scheduler thread between two decode steps (in its turn among the waiting requests), so that
        work of another kind on the same model, such as scoring a whole sequence, never runs beside a step. Returns
        a Request whose one event is fn's result (then the end; an exception of fn ends it as a failure).
        """
        return self._enqueue(Request(None, 0, 0, None, 0, False, on_event, fn=fn))

    def close(self):
        """Stop the scheduler thread once the requests in flight are done (a process should not exit with it
        inside torch: the OpenMP runtime aborts)."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    # ---------------------------------------------------------------------------------------------
    # the scheduler thread: admit, step, hand out tokens

    def _loop(self):
        limit_side_thread(self.device)
        while True:
            with self.cond:
                while not self.pending and all(o is None for o in self.owner):
                    if self.closing:
                        return
                    self.cond.wait()
                admitted = []
                while self.pending and (self.pending[0].cancelled or self.pending[0].num_samples <= self.free_slots()):
                    request = self.pending.popleft()
                    if request.cancelled:
                        request.deliver(None)
                        continue
                    request.slots = [i for i, o in enumerate(self.owner) if o is None][:request.num_samples]
                    for slot in request.slots:
                        self.owner[slot] = request
                    admitted.append(request)
            with torch.inference_mode(), self.autocast:
                for request in admitted:
                    try:
                        self._call(request) if request.fn is not None else self._prefill(request)
                    except Exception as e:  # fails this request only
                        self._release(request, e)
                try:
                    if any(o is not None for o in self.owner):
                        self._step()
                except Exception as e:  # a failed shared step fails its requests, not the server
                    for request in {o for o in self.owner if o is not None}:
                        self._release(request, e)

    def _call(self, request):
        request.deliver(request.fn())
        self._release(request)

    def _prefill(self, request):
        tokens = request.tokens
        logits, prefix = self.engine.prefill(tokens)
        for slot, rng in zip(request.slots, request.rngs):
            self.cache.load(slot, prefix, len(tokens))
            self.length[slot], self.rng[slot] = len(tokens), rng
        self._emit(request, sample_next(logits.expand(request.num_samples, -1), request.rngs, *request.sampling).tolist())

    def _decode(self, n, span):
        self.cache.begin_step(n, span)
        return self.model(self.feed[:n], kv_cache=self.cache)[:, -1, :]

    def _step(self):
        for request in {o for o in self.owner if o is not None and o.cancelled}:
            self._release(request)  # before the step: a cancelled request's rows are not computed
        if all(o is None for o in self.owner):
            return
        # the rows computed are the occupied prefix (a request takes the lowest free slots) and the positions
        # read end past the longest of them, both rounded up to a power of two (positions: at least 64):
        # one request alone costs one row, and a compiled step meets a few shapes, not one per count
        used = max(i for i, o in enumerate(self.owner) if o is not None) + 1
        n = min(self.slots, 1 << (used - 1).bit_length())
        span = min(self.max_len, max(64, 1 << max(self.length[:n]).bit_length()))
        self.cache.lengths[:n] = torch.tensor(self.length[:n], device=self.device)
        self.feed[:n, 0] = torch.tensor(self.next_input[:n], device=self.device)
        logits = self._run_step(n, span)
        for i in range(n):
            self.length[i] += self.owner[i] is not None  # only occupied slots advance
        self.steps += 1
        # every row sampled in one call, each with its request's settings and its own rng (free slots: greedy,
        # no draw); a request's finished rows draw too, as in Engine.generate, so its rngs stay in step
        temperature, top_k, top_p = zip(*(o.sampling if o is not None else (0.0, None, None) for o in self.owner[:n]))
        sampled = sample_next(logits, self.rng[:n], list(temperature), list(top_k), list(top_p)).tolist()
        for request in sorted({o for o in self.owner if o is not None}, key=lambda r: r.slots[0]):
            self._emit(request, [sampled[slot] for slot in request.slots])

    def _emit(self, request, sampled):
        """Advance a request's rows' tool state with their sampled tokens, hand the column out; release it when done.
        Whatever fails here (the tool step, a token outside the vocabulary, the consumer) ends this request alone,
        with its own error: the rows beside it never see it."""
        try:
            column, forced, vocab_size = [], [], self.model.config.vocab_size
            for row, slot, token in zip(request.rows, request.slots, sampled):
                token, was_forced = self.engine.next_token(row, token, request.tools)
                if token is not None and not 0 <= token < vocab_size:
                    raise ValueError(f"token id {token} is outside the vocabulary [0, {vocab_size})")
                column.append(token)
                forced.append(was_forced)
                self.next_input[slot] = token if token is not None else self.engine.pad_id
            request.emitted += 1
            request.deliver((column, forced))
        except Exception as e:
            return self._release(request, e)
        if all(row.done for row in request.rows) or request.emitted >= request.max_tokens:
            self._release(request)

    def _release(self, request, error=None):
        for slot in request.slots:
            if self.owner[slot] is request:  # a free slot is reset: it still feeds a (harmless, valid) token
                self.owner[slot], self.length[slot], self.rng[slot] = None, 0, None
                self.next_input[slot] = self.engine.pad_id
        request.deliver(error)

    def _run_step(self, n, span):
        """The decode step, compiled on the first call when asked (and, for "auto", kept only if faster)."""
        if self.compiled is not None:
            return self.compiled(n, span)
        if self.compile_mode == "off":
            return self._decode(n, span)
        mode, self.compile_mode = self.compile_mode, "off"  # decided once
        try:
            compiled = torch.compile(self._decode, dynamic=False,
                                     mode="reduce-overhead" if self.device.type == "cuda" else None)
            # one graph per (rows, span) bucket: at most log2(slots) x log2(max_len / 64) of them
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            for _ in range(3):  # compile, warm up
                compiled(n, span)
            if mode == "auto" and _time(lambda: compiled(n, span), self.device) > _time(lambda: self._decode(n, span), self.device):
                compiled = None
            self.compiled = compiled
            print(f"nanochat.batching: decode step {'compiled' if compiled is not None else 'eager (measured faster)'}")
            # every call above wrote this step's keys at the same positions and left the lengths alone,
            # so one more call of the chosen step is this step's real result
            return (compiled or self._decode)(n, span)
        except Exception as e:  # a platform without a working compiler: stay eager
            print(f"nanochat.batching: decode step not compiled ({type(e).__name__}: {e}); running eager")
            return self._decode(n, span)


def _time(step, device, reps=5):
    """Seconds per call of a decode step (best of reps)."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best
