"""
The chat server under attack: one table of hostile requests, each sent over a raw socket to a real
uvicorn on 127.0.0.1, with the status (or outcome) it must get. Two servers: `cli` is
`python -m scripts.chat_web` from a saved tiny checkpoint with its default guards (no API key, like the
server that was attacked); `stub` is create_app() in a thread with a slow scripted worker that raises on
'~' (queue timeouts, disconnects, internal errors), an API key and --docs; `batched` is create_app() over a
slowed random model with 16 batch slots, for attacks on the requests that share a decode step. After the
table all three must still answer.
"""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict

import pytest
import torch

from conftest import REPO_ROOT, shakespeare, wait_for_server
from nanochat.checkpoint import save_checkpoint
from nanochat.tokenizer import RustBPETokenizer
from nanochat.openai_api import Limits
from scripts.chat_web import create_app
from test_web import HELLO, Server, chromium_driver, random_worker, scripted_worker, tokenizer  # noqa: F401 (fixture)

KEY = "k3y-for-the-stub-server"
SECRET = "secret detail of /srv/nanochat/weights.pt"
EVIL = "http://evil.example"


class Target:
    def __init__(self, port, key=None):
        self.port, self.key = port, key

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def cli(tokenizer, tmp_path_factory):
    base = tmp_path_factory.mktemp("base")
    model = random_worker(tokenizer).engine.model  # 2 layers, 64 wide, re-randomised, a 64-token context
    tokenizer.save(os.path.join(base, "tokenizer"))
    with pytest.MonkeyPatch.context() as mp:  # the checkpoint records the base dir's tokenizer
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        save_checkpoint(os.path.join(base, "chatsft_checkpoints", "d2"), 1, model, [], {"model_config": asdict(model.config)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base), OMP_NUM_THREADS="1")
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", str(port), "--dtype",
                               "float32", "--allow-origin", "https://chat.example.test", "--body-timeout", "2",
                               "--limit-concurrency", "8", "--header-timeout", "2", "--max-connections", "64"],
                              cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_server(server, port)
        yield Target(port)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def stub(tokenizer):
    worker = scripted_worker(tokenizer, "slow reply ", delay=0.02, repeat=300)  # 3300 tokens: over a minute
    model, boom = worker.engine.model, tokenizer.get_mergeable_ranks()[b"~"]
    assert tokenizer.encode("~~~") == [boom] * 3
    forward = model.forward

    def exploding(idx, kv_cache=None):  # an internal error whose text must not reach the client
        if (idx == boom).any():
            raise RuntimeError(SECRET)
        return forward(idx, kv_cache)
    model.forward = exploding
    with Server(create_app([worker], Limits(queue_timeout=1.0), api_key=KEY, docs=True)) as server:
        yield Target(server.port, KEY)


@pytest.fixture(scope="module")
def batched():
    # a vocabulary that fills its 64-row padding exactly, as a 32768 one does: an id equal to the vocabulary size
    # is then outside the embedding too, and a shared step that feeds one fails for every row in it
    text = shakespeare(100_000)
    tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 448)
    assert tokenizer.get_vocab_size() % 64 == 0
    worker = random_worker(tokenizer, slots=16)
    model = worker.engine.model
    forward = model.forward

    def slowed(idx, kv_cache=None):  # ~40 steps of a victim's reply take over a second: the attack lands among them
        time.sleep(0.03)
        return forward(idx, kv_cache=kv_cache)
    model.forward = slowed
    with Server(create_app([worker])) as server:
        yield Target(server.port)
    worker.scheduler.close()


# -------------------------------------------------------------------------------------------------
# raw HTTP: what a hostile client can send, and what came back

def connect(target, timeout=10):
    return socket.create_connection(("127.0.0.1", target.port), timeout=timeout)


def head(target, method, path, length=None, **headers):
    """Request line and headers; Host, Authorization (when the target has a key) and Content-Length by default."""
    fields = {"Host": f"127.0.0.1:{target.port}", "Authorization": f"Bearer {target.key}" if target.key else None,
              "Content-Length": None if length is None else str(length)}
    fields.update({k.replace("_", "-"): v for k, v in headers.items()})
    lines = [f"{method} {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def response(sock):
    """-> (status, body text); ('closed', '') when the server hung up, ('no answer', '') on the socket timeout."""
    r = http.client.HTTPResponse(sock)
    try:
        r.begin()
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        return "closed", ""
    except TimeoutError:
        return "no answer", ""
    try:
        return r.status, r.read().decode("utf-8", "replace")
    except (TimeoutError, http.client.IncompleteRead, ConnectionResetError) as e:
        return r.status, f"<body cut: {e!r}>"


def send(method, path, body=None, raw=None, **headers):
    """A complete request: body as JSON (or raw bytes), Content-Type application/json unless given."""
    def action(target):
        data = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        fields = {"Content_Type": "application/json"} if method == "POST" else {}
        with connect(target, timeout=30) as sock:
            sock.sendall(head(target, method, path, len(data) if method == "POST" else None, **{**fields, **headers}) + data)
            return response(sock)
    return action


def post(path, body=None, **kw):
    return send("POST", path, body, **kw)


def chat(messages, path="/v1/chat/completions", headers=None, **options):
    return post(path, dict(messages=messages, **options), **(headers or {}))


def oversized(total, chunked=False):
    """A JSON body of `total` bytes, sent from a thread (the server may stop reading) while we wait for the answer."""
    def action(target):
        padding = total - len('{"messages": [{"role": "user", "content": ""}]}')
        data = b'{"messages": [{"role": "user", "content": "' + b"x" * padding + b'"}]}'
        with connect(target, timeout=30) as sock:
            if chunked:
                sock.sendall(head(target, "POST", "/v1/chat/completions", Content_Type="application/json",
                                  Transfer_Encoding="chunked"))
                pieces = [data[i:i + 65536] for i in range(0, len(data), 65536)]
                data = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            else:
                sock.sendall(head(target, "POST", "/v1/chat/completions", len(data), Content_Type="application/json"))

            def push():
                try:
                    sock.sendall(data)
                except OSError:
                    pass  # the server stopped reading: that is the point
            pusher = threading.Thread(target=push, daemon=True)
            pusher.start()
            outcome = response(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the pusher
            except OSError:
                pass  # the server already reset the connection
            pusher.join(timeout=30)
            return outcome
    return action


def stats(target):
    req = urllib.request.Request(target.url + "/stats", headers={"Authorization": f"Bearer {target.key}"} if target.key else {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_busy(target, busy, seconds=10):
    deadline = time.time() + seconds
    while stats(target)["busy"] != busy:
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def stalled_body():
    """Headers and half of a 100-byte body, then nothing: the answer must come within --body-timeout (2 s)."""
    def action(target):
        served = stats(target)["served"]
        with connect(target, timeout=6) as sock:
            sock.sendall(head(target, "POST", "/v1/chat/completions", 100, Content_Type="application/json") + b'{"mess' * 8)
            outcome = response(sock)
        assert stats(target)["served"] == served and stats(target)["busy"] == 0  # no worker was taken
        return outcome
    return action


def silent_connections(n, trickle=False):
    """
    n connections that send nothing (trickle: a byte of a request head every 0.5 s). While they are open a normal
    chat request must be served; then the server must close every one of them (the cli server: --header-timeout 2;
    --max-connections 64 closes the oldest waiting ones at once). -> the chat's (status, text), or ('N still open', '').
    """
    def action(target):
        socks = [connect(target) for _ in range(n)]
        stop, head = threading.Event(), b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100

        def drip():
            for i in range(len(head)):
                if stop.wait(0.5):
                    return
                for s in socks:
                    try:
                        s.send(head[i:i + 1])
                    except OSError:
                        pass  # closed by the server: what we want
        dripper = threading.Thread(target=drip, daemon=True)
        if trickle:
            dripper.start()
        try:
            time.sleep(0.5)  # let the server accept them all
            outcome = chat(HELLO, max_tokens=3, temperature=0)(target)
            still_open, deadline = 0, time.time() + 10
            for s in socks:
                s.settimeout(max(0.1, deadline - time.time()))
                try:
                    while s.recv(65536):  # whatever the server says before it closes
                        pass
                except TimeoutError:
                    still_open += 1
                except OSError:
                    pass  # reset: closed
            return outcome if not still_open else (f"{still_open} still open", "")
        finally:
            stop.set()
            for s in socks:
                s.close()
    return action


def stalled_requests(n, then):
    """n requests whose body stalls half-way (in progress until --body-timeout, 2 s), then `then` on one more."""
    def action(target):
        socks = [connect(target) for _ in range(n)]
        try:
            for s in socks:
                s.sendall(head(target, "POST", "/v1/chat/completions", 100, Content_Type="application/json") + b'{"mess')
            time.sleep(0.3)
            return then(target)
        finally:
            for s in socks:
                s.close()
    return action


def stream_text(target, max_tokens):
    """A greedy streamed chat -> (status, its text, finish reason), or (status, 'error', the stream) on an error event."""
    with connect(target, timeout=60) as sock:
        body = json.dumps(dict(messages=HELLO, max_tokens=max_tokens, temperature=0, stream=True)).encode()
        sock.sendall(head(target, "POST", "/v1/chat/completions", len(body), Content_Type="application/json") + body)
        status, stream = response(sock)
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    if status != 200 or any("error" in e for e in events) or not stream.rstrip().endswith("data: [DONE]"):
        return status, "error", stream[-300:]
    choices = [c for e in events for c in e["choices"]]
    return status, "".join(c["delta"].get("content", "") for c in choices), [c["finish_reason"] for c in choices][-1]


def with_victims(attack, victims=3):
    """
    `attack` while `victims` greedy streams share its decode steps (they are admitted first, so the attacker's row
    sits after theirs); each victim, and a request that comes after, must finish cleanly with the reply it gets
    alone. -> the attack's outcome.
    """
    def action(target):
        alone = stream_text(target, 40)
        assert alone[0] == 200 and alone[1] != "error" and alone[2] == "length", alone  # 40 tokens: long enough
        got = [None] * victims
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, stream_text(target, 40))) for i in range(victims)]
        for t in threads:
            t.start()
        assert wait_busy(target, victims), "the victims never took their slots"
        outcome = attack(target)
        for t in threads:
            t.join(timeout=60)
        got.append(stream_text(target, 40))
        for reply in got:
            assert reply == alone, f"a victim was hurt: {reply}"
        return outcome
    return action


def tiny_temperature_is_greedy(target):
    """/v1/completions at temperature 1e-40 -> 'greedy' when its text equals temperature 0's."""
    texts = []
    for temperature in (1e-40, 0):
        status, text = post("/v1/completions", {"prompt": "hello", "max_tokens": 12, "temperature": temperature})(target)
        assert status == 200, text
        texts.append(json.loads(text)["choices"][0]["text"])
    return ("greedy" if texts[0] == texts[1] else f"differs: {texts}"), ""


def while_busy(then):
    """`then` while a long streaming generation holds the stub's only worker (then the hog disconnects)."""
    def action(target):
        with connect(target) as hog:
            body = json.dumps(dict(messages=HELLO, max_tokens=2000)).encode()
            hog.sendall(head(target, "POST", "/chat/completions", len(body), Content_Type="application/json") + body)
            assert wait_busy(target, 1), "the hog never took the worker"
            outcome = then(target)
        assert wait_busy(target, 0), "the hog's disconnect did not free the worker"
        return outcome
    return action


def leave_completion(target):
    """Start a long /v1/completions, hang up once it is generating: 'freed' if the worker comes free."""
    with connect(target) as sock:
        body = json.dumps({"prompt": "hello", "max_tokens": 2000, "temperature": 0}).encode()
        sock.sendall(head(target, "POST", "/v1/completions", len(body), Content_Type="application/json") + body)
        assert wait_busy(target, 1), "the completion never took the worker"
    freed = wait_busy(target, 0, seconds=10)  # the generation alone takes 40 s
    return ("freed" if freed else "still generating"), ""


def nested(depth):
    return post("/v1/chat/completions", raw=b"[" * depth + b"]" * depth)


LONG_E = [{"role": "user", "content": "é" * 3000}]  # 3,000 characters, thousands of tokens
BOOM = [{"role": "user", "content": "~~~"}]

# (attack, server, request, expected status or outcome, text(s) the answer must contain, text it must not contain)
ATTACKS = [
    # 6. body size
    ("30 MB body with Content-Length", "cli", oversized(30_000_000), 413, "limit of 1000000 bytes", None),
    ("3 MB chunked body", "cli", oversized(3_000_000, chunked=True), 413, "limit of 1000000 bytes", None),
    # 7. limits in tokens
    ("3,000 x 'é' against a 64-token context", "cli", chat(LONG_E, max_tokens=4), 400,
     ("and max_tokens is 4", "beyond the model's context of 64"), None),
    ("3,000 x 'é' to the page's endpoint", "cli", chat(LONG_E, path="/chat/completions"), 400, "context of 64", None),
    ("prompt + max_tokens past the context", "cli", chat(HELLO, max_tokens=60), 400, "and max_tokens is 60", None),
    ("/v1/completions: 3,000 x 'é' as a string", "cli", post("/v1/completions", {"prompt": "é" * 3000, "max_tokens": 1}),
     400, "context of 64", None),
    ("/v1/completions: 60 ids + max_tokens 10", "cli", post("/v1/completions", {"prompt": [65] * 60, "max_tokens": 10}),
     400, "prompt 0 is 61 tokens and max_tokens is 10", None),
    # 8. cross-site use
    ("text/plain POST (no CORS preflight)", "cli", post("/v1/chat/completions", dict(messages=HELLO, max_tokens=2),
                                                        Content_Type="text/plain"), 415, "application/json", None),
    ("text/plain to /v1/completions", "cli", post("/v1/completions", {"prompt": "hi"}, Content_Type="text/plain"), 415,
     "application/json", None),
    ("Origin of another site", "cli", chat(HELLO, max_tokens=2, headers={"Origin": EVIL}), 403, "--allow-origin", None),
    ("Origin null (sandboxed frame)", "cli", chat(HELLO, max_tokens=2, headers={"Origin": "null"}), 403, "not allowed", None),
    ("DNS rebinding: a foreign Host", "cli", send("GET", "/v1/models", Host="evil.example:8000"), 403, "--allow-origin", None),
    ("same origin, as the page", "cli", lambda t: chat(HELLO, max_tokens=2, headers={"Origin": t.url})(t), 200,
     "chat.completion", None),
    ("an --allow-origin origin", "cli", chat(HELLO, max_tokens=2, headers={"Origin": "https://chat.example.test"}), 200,
     "chat.completion", None),
    ("/stats without the API key", "stub", send("GET", "/stats", Authorization=None), 401, "API key", None),
    ("a wrong key of the same length", "stub", send("GET", "/v1/models", Authorization="Bearer " + "x" * len(KEY)), 401,
     "API key", None),
    # 9. error paths
    ("JSON nested 100,000 deep", "cli", nested(100_000), 400, "nested too deeply", None),
    ("a 400-digit max_tokens", "cli", post("/v1/chat/completions", raw=b'{"messages": [{"role": "user", "content": "hi"}], '
                                                                       b'"max_tokens": 1' + b"0" * 400 + b"}"),
     400, "'max_tokens' must be between", None),
    ("'stream': 'false' (a string)", "cli", chat(HELLO, stream="false"), 400, "'stream' must be true or false", None),
    ("two user turns, streaming", "cli", chat(HELLO * 2, stream=True), 400, "roles alternate", None),
    ("two user turns, the page's endpoint", "cli", chat(HELLO * 2, path="/chat/completions"), 400, "roles alternate", None),
    ("an internal error", "stub", chat(BOOM, max_tokens=4), 500, "server log", SECRET),
    ("an internal error while streaming", "stub", chat(BOOM, max_tokens=4, stream=True), 200, "server log", SECRET),
    ("a stream times out waiting for a worker", "stub", while_busy(chat(HELLO, max_tokens=4, stream=True)), 503,
     "no worker became free", None),
    ("client leaves /v1/completions", "stub", leave_completion, "freed", None, None),
    # 10. slow clients
    ("half a body, then silence", "cli", stalled_body(), 408, "did not arrive within 2s", None),
    ("more requests in progress than --limit-concurrency", "cli", stalled_requests(8, send("GET", "/health")), 503,
     "--limit-concurrency", None),
    # issue 23: one bad request must not hurt anyone else
    ("temperature 1e-40 in a shared batch (chat)", "batched",
     with_victims(chat(HELLO, max_tokens=8, temperature=1e-40, top_k=0)), 200, "chat.completion", None),
    ("temperature 1e-40 in a shared batch (/v1/completions)", "batched",
     with_victims(post("/v1/completions", {"prompt": "hello", "max_tokens": 8, "temperature": 1e-40})), 200,
     "text_completion", None),
    ("temperature 1e-40 is greedy", "batched", tiny_temperature_is_greedy, "greedy", None, None),
    ("100 connections that send nothing", "cli", silent_connections(100), 200, "chat.completion", None),
    ("100 connections sending a header byte every 0.5 s", "cli", silent_connections(100, trickle=True), 200,
     "chat.completion", None),
    ("a 900 KB role is not echoed", "cli", chat([{"role": "x" * 900_000, "content": "hi"}]), 400, "unknown role", "x" * 100),
    ("/docs is off by default", "cli", send("GET", "/docs"), 404, None, None),
    ("/openapi.json is off by default", "cli", send("GET", "/openapi.json"), 404, None, None),
    ("--docs: /openapi.json without the key", "stub", send("GET", "/openapi.json", Authorization=None), 401, "API key", None),
    ("--docs: /docs without the key", "stub", send("GET", "/docs", Authorization=None), 401, "API key", None),
    ("--docs: /openapi.json with the key", "stub", send("GET", "/openapi.json"), 200, '"/v1/chat/completions"', None),
]


@pytest.mark.parametrize("name, server, request_, status, needle, secret", ATTACKS, ids=[row[0] for row in ATTACKS])
def test_attack(name, server, request_, status, needle, secret, cli, stub, batched):
    got, text = request_({"cli": cli, "stub": stub, "batched": batched}[server])
    assert got == status, (got, text[:500])
    assert all(n in text for n in ((needle,) if isinstance(needle, str) else needle or ())), text[:500]
    assert secret is None or secret not in text, text[:500]


def test_still_serving_after_the_attacks(cli, stub, batched):
    for target in (cli, stub, batched):
        status, text = send("GET", "/health")(target)
        assert status == 200 and json.loads(text)["status"] == "ok"
        status, text = chat(HELLO, max_tokens=3, temperature=0)(target)
        assert status == 200 and json.loads(text)["usage"]["completion_tokens"] >= 1, text
        assert wait_busy(target, 0)


def test_page_works_behind_the_guards(cli):
    """The page's own requests (same origin, JSON, no max_tokens) pass the Host/Origin/Content-Type checks."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = chromium_driver()
    try:
        driver.get(cli.url + "/")
        driver.find_element(By.ID, "input").send_keys("Hello")
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return messages.length") == 2
                                        or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error .bubble")]
        assert not errors and driver.execute_script("return messages[1].role") == "assistant", errors
    finally:
        driver.quit()
