"""
The chat server under attack: one table of hostile requests, each sent over a raw socket to a real
uvicorn on 127.0.0.1, with the status (or outcome) it must get. Two servers: `cli` is
`python -m scripts.chat_web` from a saved tiny checkpoint with its default guards (no API key, like the
server that was attacked); `stub` is create_app() in a thread with a slow scripted worker that raises on
'~' (queue timeouts, disconnects, internal errors) and an API key. After the table both must still answer.
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

from conftest import REPO_ROOT, wait_for_server
from nanochat.checkpoint import save_checkpoint
from scripts.chat_web import Limits, create_app
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
                               "--limit-concurrency", "8"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
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
    with Server(create_app([worker], Limits(queue_timeout=1.0), api_key=KEY)) as server:
        yield Target(server.port, KEY)


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


def idle_connections(n, then):
    """n connections that never send a byte, then `then` on one more."""
    def action(target):
        idle = [connect(target) for _ in range(n)]
        try:
            time.sleep(0.5)  # let the server accept them all
            return then(target)
        finally:
            for s in idle:
                s.close()
    return action


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
    ("more connections than --limit-concurrency", "cli", idle_connections(8, send("GET", "/health")), 503, None, None),
]


@pytest.mark.parametrize("name, server, request_, status, needle, secret", ATTACKS, ids=[row[0] for row in ATTACKS])
def test_attack(name, server, request_, status, needle, secret, cli, stub):
    got, text = request_({"cli": cli, "stub": stub}[server])
    assert got == status, (got, text[:500])
    assert all(n in text for n in ((needle,) if isinstance(needle, str) else needle or ())), text[:500]
    assert secret is None or secret not in text, text[:500]


def test_still_serving_after_the_attacks(cli, stub):
    for target in (cli, stub):
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
