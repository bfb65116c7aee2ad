"""The chat server: validation (TestClient), a real uvicorn server driven by the openai client, concurrency,
queue overflow, disconnects, UTF-8-safe streaming, and the page in a real headless Chromium."""

import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import shakespeare
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import RustBPETokenizer
from nanochat.openai_api import Limits
from nanochat.serving import Worker
from scripts.chat_web import create_app
from test_engine import ScriptedModel


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(100_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)


def random_worker(tokenizer, index=0, slots=1):
    torch.manual_seed(index)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return Worker(index, Engine(model.eval(), tokenizer, calculator=lambda e: "0"), tokenizer, slots=slots)


class SlowScripted(ScriptedModel):
    def __init__(self, *args, delay=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.delay = delay

    def forward(self, idx, kv_cache=None):
        time.sleep(self.delay)
        return super().forward(idx, kv_cache)


def scripted_worker(tokenizer, text, delay=0.0, repeat=1, context=4096, slots=1):
    """A stub replying `text` (one byte token a step); it claims a `context` the server's token limits check against."""
    ranks = tokenizer.get_mergeable_ranks()
    script = [ranks[bytes([b])] for b in text.encode("utf-8")] * repeat + [tokenizer.encode_special("<|assistant_end|>")]
    model = SlowScripted(tokenizer.get_vocab_size(), script, script[-1:], output_end=-1, delay=delay)
    model.config.sequence_len = context
    return Worker(0, Engine(model, tokenizer, calculator=lambda e: "0"), tokenizer, slots=slots)


def chat(messages, **kw):
    return dict(messages=messages, **kw)


HELLO = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "malformed JSON"),
    (chat([]), 400, "non-empty list"),
    (chat([{"role": "wizard", "content": "hi"}]), 400, "unknown role"),
    (chat([{"role": "user", "content": 5}]), 400, "string 'content'"),
    (chat([{"role": "user", "content": "x" * 9000}]), 400, "the limit is 8000"),
    (chat([{"role": "user", "content": "x" * 7000}, {"role": "assistant", "content": "y" * 7000}] * 3
          + [{"role": "user", "content": "z" * 7000}]), 400, "the limit is 32000"),
    (chat([{"role": "user", "content": "hi"}] * 65), 400, "too many messages"),
    (chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400, "last message must be from the user"),
    (chat(HELLO, temperature=3), 400, "'temperature' must be between"),
    (chat(HELLO, temperature="hot"), 400, "'temperature' must be a number"),
    (chat(HELLO, top_k=-1), 400, "'top_k' must be between"),
    (chat(HELLO, top_k=2.5), 400, "'top_k' must be an integer"),
    (chat(HELLO, max_tokens=0), 400, "'max_tokens' must be between"),
    (chat(HELLO, stop=["x" * 201]), 400, "at most 200 characters"),
    (chat(HELLO, max_tokens=10**6), 400, "'max_tokens' must be between"),
    (chat(HELLO, top_p=0), 400, "'top_p' must be between"),
    (chat(HELLO, n=2, stream=True), 400, "n = 1"),
    (chat(HELLO, stop=[1, 2]), 400, "'stop'"),
])
def test_validation(tokenizer, body, status, needle):
    client = TestClient(create_app([random_worker(tokenizer)]))
    for path in ("/v1/chat/completions", "/chat/completions"):
        data = body if isinstance(body, bytes) else json.dumps(body)
        r = client.post(path, content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (path, r.text)
        assert needle in r.json()["error"]["message"], r.json()


def test_api_key(tokenizer):
    client = TestClient(create_app([random_worker(tokenizer)], api_key="s3cret"))
    body = chat(HELLO, max_tokens=3)
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    assert client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/models").status_code == 401
    ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_shape_stop_and_n(tokenizer):
    client = TestClient(create_app([scripted_worker(tokenizer, "Hello there. General Kenobi!")]))
    r = client.post("/v1/chat/completions", json=chat(HELLO, temperature=0)).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["content"] == "Hello there. General Kenobi!"
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + r["usage"]["completion_tokens"]
    r = client.post("/v1/chat/completions", json=chat(HELLO, temperature=0, stop=". G")).json()
    assert r["choices"][0]["message"]["content"] == "Hello there" and r["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/chat/completions", json=chat(HELLO, temperature=0, max_tokens=5)).json()
    assert r["choices"][0]["message"]["content"] == "Hello" and r["choices"][0]["finish_reason"] == "length"
    random_client = TestClient(create_app([random_worker(tokenizer)]))
    r = random_client.post("/v1/chat/completions", json=chat(HELLO, n=3, max_tokens=6, seed=1)).json()
    assert len(r["choices"]) == 3 and [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert random_client.get("/v1/models").json()["data"][0]["object"] == "model"
    page = random_client.get("/")
    assert page.status_code == 200 and "<textarea" in page.text and "innerHTML" not in page.text


class Server:
    """A real uvicorn server on 127.0.0.1 in a background thread."""

    def __init__(self, app):
        import uvicorn
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        for _ in range(200):
            if self.server.started:
                return self
            time.sleep(0.05)
        raise RuntimeError("uvicorn did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"


def test_openai_client_streaming_and_utf8(tokenizer):
    import openai
    text = "Hi 😀 你好, naïve ∑ 🙂!"
    with Server(create_app([scripted_worker(tokenizer, text)], model_name="stub")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        full = client.chat.completions.create(model="stub", messages=HELLO, temperature=0)
        assert full.choices[0].message.content == text and full.choices[0].finish_reason == "stop"
        pieces = []
        for chunk in client.chat.completions.create(model="stub", messages=HELLO, temperature=0, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces) and len(pieces) > 3
        # the page's endpoint: SSE events carry whole characters only
        tokens = []
        with httpx.stream("POST", server.url + "/chat/completions", json=chat(HELLO), timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    tokens.append(event.get("token", ""))
        assert "".join(tokens) == text and not any("\ufffd" in t for t in tokens)


def test_sixteen_concurrent_streams(tokenizer):
    import openai
    workers = [random_worker(tokenizer, 0), random_worker(tokenizer, 1)]
    with Server(create_app(workers, Limits(max_queue=32))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        results, errors = [None] * 16, []

        def one(i):
            try:
                text = ""
                for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"hi {i}"}],
                                                            max_tokens=12, stream=True, seed=i):
                    if chunk.choices and chunk.choices[0].delta.content:
                        text += chunk.choices[0].delta.content
                results[i] = text
            except Exception as e:  # collected, asserted below
                errors.append(repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors and all(r is not None for r in results)
        stats = httpx.get(server.url + "/stats").json()
        assert stats["served"] == 16 and stats["busy"] == 0


def test_queue_overflow_and_disconnect_free_the_worker(tokenizer):
    slow = scripted_worker(tokenizer, "slow reply ", delay=0.05, repeat=200)
    with Server(create_app([slow], Limits(max_queue=0, max_tokens=4096))) as server:
        body = chat(HELLO, max_tokens=2000, temperature=0)
        with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()  # one iterator: dropping one closes the stream (a disconnect)
            next(lines)  # generation has started: the only worker is busy
            assert httpx.get(server.url + "/stats").json()["busy"] == 1
            busy = httpx.post(server.url + "/v1/chat/completions", json=chat(HELLO, max_tokens=5), timeout=30)
            assert busy.status_code == 503 and "server busy" in busy.json()["error"]["message"]
        # the client went away mid-stream: its generation stops and the worker is free again
        for _ in range(100):
            if httpx.get(server.url + "/stats").json()["busy"] == 0:
                break
            time.sleep(0.1)
        assert httpx.get(server.url + "/stats").json() == {**httpx.get(server.url + "/stats").json(), "busy": 0}
        assert httpx.post(server.url + "/v1/chat/completions", json=chat(HELLO, max_tokens=3), timeout=30).status_code == 200


def test_continuous_batching_serves_each_request_as_if_alone(tokenizer):
    """Real clients, real server, one worker with 4 batch slots: 8 concurrent requests (different prompts,
    greedy and seeded sampling, streaming or not) get exactly the replies they get one at a time."""
    worker = random_worker(tokenizer, 0, slots=4)
    bodies = [chat([{"role": "user", "content": "word " * (1 + i)}], max_tokens=6 + 2 * i,
                   temperature=0 if i % 2 else 1.0, seed=i, stream=i % 3 == 0) for i in range(8)]

    def ask(server, body):
        if not body["stream"]:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]
        text = ""
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][0]["delta"]
                    text += delta.get("content") or ""
        return text

    with Server(create_app([worker], Limits(max_queue=16))) as server:
        alone = [ask(server, b) for b in bodies]
        together = [None] * len(bodies)
        threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(server, bodies[i]))) for i in range(8)]
        steps_before = worker.scheduler.steps
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert together == alone and any(alone)
        stats = httpx.get(server.url + "/stats").json()
        assert stats["slots"] == 4 and stats["busy"] == 0
        shared = worker.scheduler.steps - steps_before
        assert shared < sum(b["max_tokens"] for b in bodies)  # the requests shared decode steps


def test_a_stop_string_across_pieces_is_never_streamed(tokenizer):
    """Text that could be the start of a stop string is held back until it is known not to be one."""
    from nanochat.serving import ReplyStream
    worker = random_worker(tokenizer)
    ranks = tokenizer.get_mergeable_ranks()
    end = tokenizer.encode_special("<|assistant_end|>")
    for reply, stop, sent, finish in [("ab cd ef", ["cd"], "ab ", "stop"), ("ab c d", ["cd"], "ab c d", "stop"),
                                      ("xyz", ["z", "yq"], "xy", "stop"), ("ab c", ["cd"], "ab c", "length")]:
        events = []
        stream = ReplyStream(worker, [1, 2], {"stop": stop, "n": 1}, lambda kind, payload: events.append((kind, payload)))
        tokens = [ranks[bytes([b])] for b in reply.encode()] + ([end] if finish == "stop" and reply == "ab c d" else [])
        for t in tokens:
            if stream.push([t]):
                break
        stream.end()
        streamed = "".join(p for kind, (_, p) in ((k, v) for k, v in events if k == "text"))
        assert streamed == sent and events[-1][1]["texts"] == [sent], (reply, stop, events)
        assert events[-1][1]["finish"] == [finish]


def test_batched_streams_run_on_the_scheduler_thread_with_usage_and_stop_strings(tokenizer):
    """With batch slots, streamed replies are made on the scheduler's thread (no thread per request): the text,
    the stop-string cut and the usage chunk (stream_options.include_usage) equal the non-streamed answer."""
    worker = random_worker(tokenizer, 0, slots=4)

    def stream(body):
        text, usage, chunks = "", None, 0
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        assert event["choices"] == [] and usage is None
                        usage = event["usage"]
                        continue
                    assert usage is None, "the usage chunk comes last"
                    content = event["choices"][0]["delta"].get("content")
                    if content:
                        text, chunks = text + content, chunks + 1
        return text, usage, chunks

    with Server(create_app([worker], Limits(max_queue=16))) as server:
        plain = httpx.post(server.url + "/v1/chat/completions", json=chat(HELLO, max_tokens=40, temperature=0)).json()
        reply = plain["choices"][0]["message"]["content"]
        assert len(reply) > 20 and plain["usage"]["completion_tokens"] == 40
        cut = reply[12:16]  # a stop string from the middle of the reply
        for extra in ({}, {"stop": [cut]}, {"stop": [reply[:1]]}):  # the last: stopped at its first token
            body = chat(HELLO, max_tokens=40, temperature=0, **extra)
            whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
            results = [None] * 6
            threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(
                dict(body, stream=True, stream_options={"include_usage": True})))) for i in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            for text, usage, chunks in results:
                assert text == whole["choices"][0]["message"]["content"]
                assert usage == whole["usage"]
                assert chunks <= usage["completion_tokens"] and (chunks > 0) == bool(text)
            if extra:
                stop = extra["stop"][0]
                assert text == reply[:reply.index(stop)] and usage["completion_tokens"] < 40  # stopped, not run to the end
        # without include_usage there is no usage chunk; stream_options needs stream: true
        assert stream(dict(body, stream=True))[1] is None
        r = httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream_options={"include_usage": True}))
        assert r.status_code == 400 and "stream_options" in r.text
        r = httpx.post(server.url + "/v1/chat/completions", json=chat(HELLO, n=5, max_tokens=4))  # more rows than slots
        assert r.status_code == 400 and "4 slots" in r.text
        assert httpx.get(server.url + "/stats").json()["busy"] == 0


def test_a_failing_batched_step_is_a_generic_error_and_frees_the_slot(tokenizer):
    worker = random_worker(tokenizer, 0, slots=2)
    model, forward = worker.engine.model, worker.engine.model.forward
    boom = tokenizer.encode("~")[0]

    def exploding(idx, *args, **kwargs):  # an internal error whose text must not reach the client
        if (idx == boom).any():
            raise RuntimeError("secret internal detail")
        return forward(idx, *args, **kwargs)
    model.forward = exploding
    with Server(create_app([worker], Limits(max_queue=4))) as server:
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                          json=chat([{"role": "user", "content": "~"}], max_tokens=8, stream=True)) as r:
            body = r.read().decode()
        assert r.status_code == 200 and '"server_error"' in body and "secret" not in body
        r = httpx.post(server.url + "/v1/chat/completions", json=chat([{"role": "user", "content": "~"}], max_tokens=8))
        assert r.status_code == 500 and "secret" not in r.text
        ok = httpx.post(server.url + "/v1/chat/completions", json=chat(HELLO, max_tokens=8, temperature=0))
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(server.url + "/stats").json()["busy"] == 0 and worker.scheduler.free_slots() == 2


def test_a_disconnect_frees_its_batch_slot(tokenizer):
    worker = scripted_worker(tokenizer, "slow reply ", delay=0.05, repeat=200, slots=2)  # 2000 tokens: 100 s
    with Server(create_app([worker], Limits(max_queue=4, max_tokens=4096))) as server:
        body = chat(HELLO, max_tokens=2000, temperature=0)
        with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            assert worker.scheduler.free_slots() == 1
        for _ in range(100):
            if worker.scheduler.free_slots() == 2 and httpx.get(server.url + "/stats").json()["busy"] == 0:
                break
            time.sleep(0.05)
        assert worker.scheduler.free_slots() == 2 and httpx.get(server.url + "/stats").json()["busy"] == 0
        assert worker.scheduler.steps < 100  # stopped at the disconnect, not after its 2000 tokens


def chromium_driver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium/chromedriver are missing under CI (install the Debian packages chromium chromium-driver)")
        pytest.skip("no chromium/chromedriver on this machine (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_headless_chromium(tokenizer, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    hostile = 'Hello! <img src=x onerror="window.__pwned=1"><script>window.__pwned=1</script> bye'
    driver = chromium_driver()
    try:
        with Server(create_app([scripted_worker(tokenizer, hostile, delay=0.01)])) as server:
            driver.get(server.url + "/")
            box = driver.find_element(By.ID, "input")
            box.send_keys("Say something")
            driver.find_element(By.ID, "send").click()
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant .bubble")) == 1
                       and d.find_element(By.CSS_SELECTOR, ".msg.assistant .bubble").text.endswith("bye"))
            reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .bubble")
            assert reply.text == hostile  # shown as literal text
            assert driver.execute_script("return window.__pwned") is None  # and nothing ran
            assert not driver.find_elements(By.CSS_SELECTOR, ".msg.assistant img, .msg.assistant script")
            assert driver.find_element(By.CSS_SELECTOR, ".msg.user .bubble").text == "Say something"
            shot = tmp_path / "web_chat.png"
            driver.save_screenshot(str(shot))
            assert shot.stat().st_size > 1000
            try:
                shutil.copy(shot, "/tmp/nanochat_web_screenshot.png")
            except OSError:
                pass
    finally:
        driver.quit()


def test_server_errors_are_shown_on_the_page(tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    driver = chromium_driver()
    try:
        with Server(create_app([random_worker(tokenizer)], Limits(max_message_chars=10))) as server:
            driver.get(server.url + "/")
            driver.find_element(By.ID, "input").send_keys("this message is far too long")
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error .bubble"))
            assert "the limit is 10" in driver.find_element(By.CSS_SELECTOR, ".msg.error .bubble").text
    finally:
        driver.quit()


def test_list_style_content_as_openai_clients_send_it(tokenizer):
    """Contents as [{"type": "text", "text": ...}] (OpenAI clients, vLLM's warm-up) are the joined text; an assistant
    turn may hold its tool calls as python / python_output parts; any other part is a clear 400."""
    client = TestClient(create_app([random_worker(tokenizer)]))
    plain = chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                 max_tokens=6, temperature=0)
    parts = chat([{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
                 max_tokens=6, temperature=0)
    want = client.post("/v1/chat/completions", json=plain).json()
    got = client.post("/v1/chat/completions", json=parts).json()
    assert got["choices"] == want["choices"] and got["usage"] == want["usage"]
    tool_turn = [{"role": "user", "content": "1+2?"},
                 {"role": "assistant", "content": [{"type": "python", "text": "1+2"}, {"type": "python_output", "text": "3"},
                                                   {"type": "text", "text": "3."}]},
                 {"role": "user", "content": [{"type": "text", "text": "Thanks"}]}]
    assert client.post("/v1/chat/completions", json=chat(tool_turn, max_tokens=2)).status_code == 200
    for content, needle in [([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "got type 'image_url'"),
                            ([{"type": "python", "text": "1+2"}], "got type 'python'"),  # only an assistant's
                            ([{"type": "text", "text": 5}], "content part 0 must be"),
                            ([], "string 'content'"), ([{"type": "text", "text": "x" * 9000}], "the limit is 8000")]:
        r = client.post("/v1/chat/completions", json=chat([{"role": "user", "content": content}]))
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_one_slot_serves_every_feature_through_the_scheduler(tokenizer):
    """--batch-slots 1 is a pool of one slot: seeds reproduce, n samples, the calculator and /v1/completions all work
    there, and give what a worker of 4 slots gives."""
    sp = tokenizer.encode_special
    ranks = tokenizer.get_mergeable_ranks()
    head = [sp("<|python_start|>")] + [ranks[bytes([b])] for b in b"1+2"] + [sp("<|python_end|>")]
    tail = [ranks[bytes([b])] for b in b" so 3."] + [sp("<|assistant_end|>")]
    seen = []
    tool = Worker(0, Engine(ScriptedModel(tokenizer.get_vocab_size(), head, tail, sp("<|output_end|>")), tokenizer,
                            calculator=lambda e: seen.append(e) or "3"), tokenizer)
    r = TestClient(create_app([tool])).post("/v1/chat/completions", json=chat(HELLO, temperature=0)).json()
    assert seen == ["1+2"] and r["choices"][0]["message"]["content"] == "1+23 so 3."  # the tool's output is forced in
    answers = []
    for slots in (1, 4):
        client = TestClient(create_app([random_worker(tokenizer, slots=slots)]))
        sampled = [client.post("/v1/chat/completions", json=chat(HELLO, n=3, max_tokens=8, seed=5)).json() for _ in range(2)]
        assert sampled[0]["choices"] == sampled[1]["choices"] and len(sampled[0]["choices"]) == 3
        body = {"prompt": ["To be", tokenizer.encode("or not")], "max_tokens": 4, "logprobs": 2, "temperature": 0}
        completion = client.post("/v1/completions", json=body).json()
        for choice in completion["choices"]:
            lp = choice["logprobs"]
            assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
            assert all(len(top) <= 2 and max(top.values()) >= value for top, value in zip(lp["top_logprobs"], lp["token_logprobs"]))
        echo = client.post("/v1/completions", json={"prompt": "To be", "max_tokens": 0, "echo": True, "logprobs": 0}).json()
        assert echo["choices"][0]["text"] == "To be" and echo["usage"]["completion_tokens"] == 0
        answers.append((sampled[0]["choices"], completion["choices"], echo["choices"]))
    assert answers[0] == answers[1]
