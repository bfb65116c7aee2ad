"""
The OpenAI-compatible API of the chat server, without its routes: the request limits; request
validation with a specific 4xx for every bad field (in tokens where the model counts in tokens: prompt +
max_tokens must fit the context), the body read with a size and time limit; the response and stream
chunk shapes; error responses that quote user values only as short prefixes; and /v1/completions, raw
text completion with log-probabilities (TextCompletion). scripts/chat_web.py serves it; nothing here
starts a server.

Chat messages' content is a string, or a list of {"type": "text", "text": ...} parts as OpenAI clients
send it (joined, as the exported chat template joins them; an assistant turn may also hold python and
python_output parts, its tool calls). A leading system message is folded into the first user turn.
"""

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fastapi.responses import JSONResponse

from nanochat.sampling import MIN_TEMPERATURE


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


class APIError(Exception):
    def __init__(self, status, message, kind="invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


MAX_MESSAGE_CHARS = 400  # an error message never carries more than this (it may quote user values)


def shown(value, chars=40):
    """A user value as quoted in an error message: its repr, cut to a short prefix."""
    text = repr(value)
    return text if len(text) <= chars else f"{text[:chars]}... ({len(text)} characters)"


def error_response(e):
    # 408/413 leave part of the body unread: the connection cannot carry another request
    headers = {"Connection": "close"} if e.status in (408, 413) else None
    message = e.message if len(e.message) <= MAX_MESSAGE_CHARS else e.message[:MAX_MESSAGE_CHARS] + "... (cut)"
    return JSONResponse({"error": {"message": message, "type": e.kind, "code": e.code}}, status_code=e.status,
                        headers=headers)


async def read_json(request, limits):
    """The body as JSON, counted while it is read so that no more than max_body_bytes is ever buffered."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise APIError(415, f"send the body as JSON with 'Content-Type: application/json' (got {ctype[:50] or 'none'!r})")
    too_big = APIError(413, f"the request body is over the limit of {limits.max_body_bytes} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_big
    loop = asyncio.get_running_loop()
    deadline, chunks, size = loop.time() + limits.body_timeout, [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), timeout=deadline - loop.time())
        except asyncio.TimeoutError:
            raise APIError(408, f"the request body did not arrive within {limits.body_timeout:g}s", code="body_timeout")
        if message["type"] == "http.disconnect":
            raise APIError(499, "client disconnected")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > limits.max_body_bytes:
            raise too_big
        if not message.get("more_body"):
            break
    try:
        return json.loads(b"".join(chunks))
    except RecursionError:
        raise APIError(400, "malformed JSON: nested too deeply")
    except ValueError as e:
        raise APIError(400, f"malformed JSON: {e}")


def body_number(body, name, default, lo, hi, kind=float):
    """body[name] as a number of `kind` within [lo, hi] (default when absent or null), else APIError(400)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a{'n integer' if kind is int else ' number'}")
    if not lo <= value <= hi:  # before float(): a 400-digit integer does not fit a float
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {str(value)[:30]}")
    if kind is int and not float(value).is_integer():
        raise APIError(400, f"'{name}' must be an integer")
    return kind(value)


def body_flag(body, name, default=False):
    value = body.get(name, default)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {json.dumps(value)[:30]}")
    return default if value is None else value


def body_stop(body):
    """body['stop'] as a list of at most 4 non-empty strings, else APIError(400)."""
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) and x for x in stop):
        raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings")
    if any(len(x) > 200 for x in stop):
        raise APIError(400, "a 'stop' string may have at most 200 characters")
    return stop


def check_context(what, prompt_tokens, max_tokens, context):
    if prompt_tokens + max_tokens > context:
        raise APIError(400, f"{what} is {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
                            f"tokens, beyond the model's context of {context}; shorten the prompt or lower max_tokens",
                       code="context_length_exceeded")


def message_content(i, m):
    """A message's content as the tokenizer takes it: a string (text parts joined), or an assistant's list of parts
    when it holds tool calls; None when it is neither a string nor a list of parts (the caller's 400)."""
    content = m.get("content")
    if not isinstance(content, list) or not content:
        return content if isinstance(content, str) else None
    kinds = ("text", "python", "python_output") if m.get("role") == "assistant" else ("text",)
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str) or part.get("type") not in kinds:
            kind = part.get("type") if isinstance(part, dict) else part
            raise APIError(400, f"message {i} content part {j} must be {{'type': 'text', 'text': <string>}}"
                                f"{' (or python, python_output)' if len(kinds) > 1 else ''}, got type {shown(kind)}")
    if all(part["type"] == "text" for part in content):
        return "".join(part["text"] for part in content)
    return [{"type": part["type"], "text": part["text"]} for part in content]


def validate(body, limits, openai, tokenizer, context):
    """-> (prompt token ids, options) or raises APIError(400) with the specific reason."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"too many messages: {len(messages)} > {limits.max_messages}")
    total, messages = 0, [dict(m, content=message_content(i, m)) if isinstance(m, dict) else m
                          for i, m in enumerate(messages)]
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m["content"] is None:
            raise APIError(400, f"message {i} must be an object with a string 'content' (or a list of text parts)")
        if m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"message {i} has unknown role {shown(m.get('role'))}; use system, user or assistant")
        if m["role"] == "system" and i != 0:
            raise APIError(400, "a system message may only come first")
        chars = sum(len(p["text"]) for p in m["content"]) if isinstance(m["content"], list) else len(m["content"])
        if chars > limits.max_message_chars:
            raise APIError(400, f"message {i} is {chars} characters; the limit is {limits.max_message_chars}")
        total += chars
    if total > limits.max_total_chars:
        raise APIError(400, f"the conversation is {total} characters; the limit is {limits.max_total_chars}")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user")

    options = {
        "temperature": body_number(body, "temperature", 0.6 if not openai else 1.0, 0.0, 2.0),
        "top_k": body_number(body, "top_k", 50, 0, limits.max_top_k, int),
        "top_p": body_number(body, "top_p", 1.0, 1e-6, 1.0),
        "max_tokens": body_number(body, "max_tokens", None, 1, limits.max_tokens, int),
        "n": body_number(body, "n", 1, 1, limits.max_n, int),
        "seed": body_number(body, "seed", None, 0, 2**31 - 1, int),
        "stop": body_stop(body),
        "stream": body_flag(body, "stream") or not openai,  # the page's endpoint always streams
    }
    if options["temperature"] < MIN_TEMPERATURE:
        options["temperature"] = 0.0  # greedy: a smaller temperature could not change a token
    if options["stream"] and options["n"] > 1:
        raise APIError(400, "streaming supports n = 1 only")
    stream_options = body.get("stream_options")
    if stream_options is not None:  # OpenAI's: {"include_usage": true} adds a last chunk with the token counts
        if not options["stream"] or not openai:
            raise APIError(400, "'stream_options' is only allowed with stream: true")
        if not isinstance(stream_options, dict):
            raise APIError(400, "'stream_options' must be an object")
        options["include_usage"] = body_flag(stream_options, "include_usage")
    try:  # the role order, and the length in tokens, before any response starts
        prompt = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    except ValueError as e:
        raise APIError(400, str(e))
    if options["max_tokens"] is None:  # by default, what the context leaves (at most 512)
        options["max_tokens"] = max(1, min(512, context - len(prompt)))
    check_context("the conversation", len(prompt), options["max_tokens"], context)
    return prompt, options


def validate_completion(body, limits, tokenizer, context):
    """/v1/completions -> (prompts as lists of token ids, options); APIError(400) otherwise."""
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
    vocab_size, ids = tokenizer.get_vocab_size(), []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p or len(p) > limits.max_total_chars:
                raise APIError(400, f"prompt {i} must have 1 to {limits.max_total_chars} characters")
            p = tokenizer.encode(p)
        if len(p) > limits.max_prompt_tokens:
            raise APIError(400, f"prompt {i} has {len(p)} tokens; the limit is {limits.max_prompt_tokens}")
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"prompt {i} has token id {str(bad)[:30]}, outside the vocabulary [0, {vocab_size})")
        ids.append(list(p))
    options = {name: body_number(body, name, default, lo, hi, kind) for name, default, lo, hi, kind in (
        ("max_tokens", 16, 0, limits.max_tokens, int), ("temperature", 1.0, 0.0, 2.0, float),
        ("top_p", 1.0, 1e-6, 1.0, float), ("seed", None, 0, 2**31 - 1, int), ("logprobs", None, 0, 20, int),
        ("n", 1, 1, 1, int))}
    if options["temperature"] < MIN_TEMPERATURE:
        options["temperature"] = 0.0
    options["echo"] = body_flag(body, "echo")
    if body_flag(body, "stream"):
        raise APIError(400, "streaming is not supported on /v1/completions; use /v1/chat/completions")
    options["stop"] = body_stop(body)
    bos = tokenizer.get_bos_token_id()
    for i, p in enumerate(ids):  # complete() puts a <|bos|> before a prompt that lacks one
        check_context(f"prompt {i}", len(p) + (p[0] != bos), options["max_tokens"], context)
    return ids, options


# -------------------------------------------------------------------------------------------------
# response shapes

def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(model, info):
    """A whole chat.completion from a reply job's 'end' payload (serving.ReplyStream)."""
    return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                                        for i, (text, finish) in enumerate(zip(info["texts"], info["finish"]))],
            "usage": usage(info["prompt_tokens"], info["completion_tokens"])}


async def chat_chunks(events, model, include_usage=False):
    """A streamed chat completion as server-sent events: a role chunk, a chunk per piece of text, a last chunk with
    the finish reason (then, with include_usage, one with the token counts), then [DONE]."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(delta=None, finish=None, counts=None):
        shape = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [] if counts else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return "data: " + json.dumps(dict(shape, usage=counts) if counts else shape) + "\n\n"
    yield chunk({"role": "assistant", "content": ""})
    async for kind, payload in events:
        if kind == "text":
            yield chunk({"content": payload[1]})
        elif kind == "error":
            yield "data: " + json.dumps({"error": {"message": payload, "type": "server_error"}}) + "\n\n"
        else:
            yield chunk({}, payload["finish"][0])
            if include_usage:
                yield chunk(counts=usage(payload["prompt_tokens"], payload["completion_tokens"]))
    yield "data: [DONE]\n\n"


def text_completion(model, choices):
    """The text_completion response from TextCompletion's choices."""
    prompt_tokens = sum(c.pop("prompt_tokens") for c in choices)
    completion_tokens = sum(c.pop("completion_tokens") for c in choices)
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model, "choices": [dict(c, index=i) for i, c in enumerate(choices)],
            "usage": usage(prompt_tokens, completion_tokens)}


# -------------------------------------------------------------------------------------------------
# /v1/completions: raw text completion with log-probabilities, the OpenAI legacy semantics that
# lm-evaluation-harness's `local-completions` model relies on. A prompt (text, or token ids) is scored after an
# implicit <|bos|> (every training document began with one) unless it already starts with it. With echo, the
# prompt's tokens come back with the log-probability of each given what precedes it; then max_tokens tokens are
# sampled (tools off: plain language modelling) and come back with theirs. Log-probabilities are of the model's
# own distribution (log-softmax of the soft-capped logits), whatever the sampling temperature; the harness sends
# max_tokens=1, echo, logprobs=1 and sums token_logprobs[ctxlen:-1].

class TextCompletion:
    """
    The job (serving.WorkerPool.run) of one /v1/completions request, on one slot of a worker's scheduler and driven
    by its callbacks, with no thread of its own: each prompt in turn is sampled, then, with logprobs, its whole
    sequence is scored in one forward on the scheduler thread (BatchScheduler.call). Emits ('end', choices) after
    the last prompt; cancel() stops it at the scheduler's next step.
    """

    def __init__(self, worker, prompts, options, emit, done):
        self.scheduler, self.tok, self.model = worker.scheduler, worker.tokenizer, worker.engine.model
        self.stop_ids, self.prompts, self.options, self.emit, self.done = worker.engine.stop_ids, prompts, options, emit, done
        self.choices, self.lock, self.current, self.cancelled = [], threading.Lock(), None, False
        self.next_prompt()

    def cancel(self):
        with self.lock:
            self.cancelled = True
            if self.current is not None:
                self.current.cancel()

    def then(self, submit, finish):
        """Submits the next piece of work (submit(on_event) -> a scheduler Request); finish(its events) follows it."""
        got = []

        def on_event(event):
            if event is not None and not isinstance(event, BaseException):
                return got.append(event)
            if event is not None or self.cancelled:
                return self.done(event)
            try:
                finish(got)
            except Exception as e:  # whatever fails ends this request alone, as an internal error
                self.done(e)
        with self.lock:
            if not self.cancelled:
                self.current = submit(on_event)
                return
        self.done(None)

    def next_prompt(self):
        i, o = len(self.choices), self.options
        if i == len(self.prompts):
            self.done(None)
            return self.emit("end", self.choices)
        prompt, bos = self.prompts[i], self.tok.get_bos_token_id()
        context = prompt if prompt[:1] == [bos] else [bos] + prompt
        seed = (o["seed"] if o["seed"] is not None else 0) + i
        if o["max_tokens"] == 0:
            return self.sampled(prompt, context, [])
        self.then(lambda on_event: self.scheduler.submit(context, max_tokens=o["max_tokens"], temperature=o["temperature"],
                                                         top_p=o["top_p"], seed=seed, tools=False, on_event=on_event),
                  lambda steps: self.sampled(prompt, context, [c[0] for c, _ in steps]))

    def sampled(self, prompt, context, tokens):
        o, tok = self.options, self.tok
        new = [t for t in tokens if t is not None and t not in self.stop_ids]
        finish = "stop" if len(new) < o["max_tokens"] else "length"  # fewer tokens than asked: a stop token ended it
        text = tok.decode(new)
        for s in o["stop"]:
            if s in text:
                text, finish = text[:text.index(s)], "stop"
                kept = 0  # the tokens kept are the shortest prefix whose text covers the cut text
                while kept < len(new) and len(tok.decode(new[:kept])) < len(text):
                    kept += 1
                new = new[:kept]
        choice = {"text": (tok.decode(prompt) if o["echo"] else "") + text, "finish_reason": finish,
                  "prompt_tokens": len(prompt), "completion_tokens": len(new), "logprobs": None}
        if o["logprobs"] is None:
            self.choices.append(choice)
            return self.next_prompt()
        first = len(context) - len(prompt) if o["echo"] else len(context)  # the first position reported

        def scored(events):
            choice["logprobs"] = events[0]
            self.choices.append(choice)
            self.next_prompt()
        self.then(lambda on_event: self.scheduler.call(lambda: logprobs(self.model, tok, context + new, first, o["logprobs"]),
                                                       on_event), scored)


def logprobs(model, tokenizer, sequence, first, k):
    """OpenAI's logprobs object for sequence[first:], each token given what precedes it (one forward over the
    sequence), with the k likeliest tokens at each position (k = 0: none)."""
    logits = model(torch.tensor([sequence], dtype=torch.long, device=model.get_device()))[0].float()
    logp = F.log_softmax(logits, dim=-1)  # logp[i] predicts sequence[i + 1]
    token_logprobs, top_logprobs = [], []
    for pos in range(first, len(sequence)):
        if pos == 0:  # the first token, with nothing before it
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(logp[pos - 1, sequence[pos]].item())
        top = {}
        if k > 0:
            values, indices = logp[pos - 1].topk(k)
            for v, i in zip(values.tolist(), indices.tolist()):
                top.setdefault(tokenizer.decode([i]), v)  # two ids may decode alike: keep the likelier
        top_logprobs.append(top)
    strings, offsets, at = [tokenizer.decode([t]) for t in sequence[first:]], [], 0
    for s in strings:
        offsets.append(at)
        at += len(s)
    return {"tokens": strings, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
