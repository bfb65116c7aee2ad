"""
The OpenAI-compatible request side of the chat server: request validation with a specific 4xx for
every bad field (in tokens where the model counts in tokens: prompt + max_tokens must fit the context),
the body read with a size and time limit, and error responses that quote user values only as short
prefixes. scripts/chat_web.py serves it; nothing here starts a server.
"""

import asyncio
import json

from fastapi.responses import JSONResponse

from nanochat.sampling import MIN_TEMPERATURE


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


def validate(body, limits, openai, tokenizer, context):
    """-> (prompt token ids, options) or raises APIError(400) with the specific reason."""
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
            raise APIError(400, f"message {i} has unknown role {shown(m.get('role'))}; use system, user or assistant")
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
