"""
Serving under load: N concurrent streaming clients against the real server on loopback
(`python -m scripts.chat_web` on a random depth-4 model saved as a checkpoint in a temporary base dir,
--workers CPU replicas), each sending --requests requests, twice in one run on the same model: one
request per worker at a time (--batch-slots 1) and continuous batching (--slots requests share each
decode step). Prints requests/s, time to first token p50/p95, streamed tokens/s and errors per mode
and the ratio; the last line is a JSON object with every figure.

    python -m bench.serve --clients 16 --requests 2
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import httpx
import torch

from bench import REPO_ROOT, data_dir, read_text
from nanochat.checkpoint import save_checkpoint
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import RustBPETokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--slots", type=int, default=16, help="batch slots per worker in the continuous-batching run")
    p.add_argument("--compile-decode", default="off", choices=["auto", "on", "off"])
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    text = read_text(data_dir(small_ok=True), "pretrain", "tinyshakespeare", "input.txt")
    tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), 4096)
    torch.manual_seed(0)
    model = GPT(config_for_depth(args.depth, tokenizer.get_vocab_size(), 1024, head_dim=64))
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
        specials = [tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()]
        model.lm_head.weight[specials] = 0  # replies run to max_tokens: a fixed amount of work per request
    base = tempfile.mkdtemp(prefix="nanochat-bench-serve-")
    os.environ["NANOCHAT_BASE_DIR"] = base  # the checkpoint records this base dir's tokenizer; the server reads both
    tokenizer.save(os.path.join(base, "tokenizer"))
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", f"d{args.depth}"), 0, model, [],
                    {"model_config": asdict(model.config)})
    rows = []
    print(f"{args.clients} streaming clients x {args.requests} requests x {args.max_tokens} tokens, "
          f"{args.workers} worker(s), depth {args.depth}, {torch.get_num_threads()} threads")
    print("| mode | requests | errors | requests/s | TTFT p50 s | TTFT p95 s | streamed tokens/s | vs one-per-worker |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, slots in (("one request per worker", 1), (f"continuous batching, {args.slots} slots", args.slots)):
        result = run_clients(slots, args)
        result["mode"], result["slots"] = name, slots
        rows.append(result)
        ratio = result["stream_tokens_per_s"] / rows[0]["stream_tokens_per_s"]
        print(f"| {name} | {result['requests']} | {result['errors']} | {result['requests_per_s']:.2f} | "
              f"{result['ttft_p50_s']:.2f} | {result['ttft_p95_s']:.2f} | {result['stream_tokens_per_s']:.0f} | "
              f"{ratio:.2f}x |", flush=True)
        if result["error_samples"]:
            print("errors:", result["error_samples"])
    print(json.dumps(rows))
    shutil.rmtree(base, ignore_errors=True)


def run_clients(slots, args):
    """The server (`python -m scripts.chat_web`, fp32 on the CPU, `slots` batch slots per worker) on a free loopback port,
    and args.clients concurrent streaming clients in a process of their own (in the bench's process they would
    share its GIL, which no real client does)."""
    import multiprocessing
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port", str(port), "--device-type", "cpu",
                               "--dtype", "float32", "--num-workers", str(args.workers), "--batch-slots", str(slots),
                               "--compile-decode", args.compile_decode, "--max-queue", str(4 * args.clients),
                               "--limit-concurrency", str(max(64, 2 * args.clients))], cwd=REPO_ROOT,
                              stdout=subprocess.DEVNULL)  # its start-up line would break the table; errors go to stderr
    try:
        deadline = time.time() + 300
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.time() > deadline:
                    sys.exit("error: the server (python -m scripts.chat_web) did not come up; its errors are above")
                time.sleep(0.3)
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        clients = ctx.Process(target=client_process, args=(f"http://127.0.0.1:{port}/v1/chat/completions",
                                                            args.clients, args.requests, args.max_tokens, results))
        clients.start()
        result = results.get()
        clients.join()
    finally:
        server.terminate()
        server.wait(timeout=60)
    result["workers"] = args.workers
    return result


def client_process(url, n_clients, n_requests, max_tokens, results):
    """n_clients concurrent streaming clients (asyncio), n_requests each, one after another. Tokens are counted
    from each reply's usage chunk (a chunk may carry several tokens when a client falls behind)."""
    import asyncio

    async def client(http, c, ttfts, errors, tokens):
        for r in range(n_requests):
            body = {"messages": [{"role": "user", "content": f"Tell me a story, number {c}-{r}."}],
                    "max_tokens": max_tokens, "stream": True, "temperature": 0.8, "seed": c * 100 + r,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            first, usage = None, None
            try:
                async with http.stream("POST", url, json=body) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"HTTP {response.status_code}")
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            usage = event["usage"]
                        elif first is None and (event["choices"][0].get("delta") or {}).get("content"):
                            first = time.perf_counter() - t0  # includes any wait for a free slot
                if usage is None:
                    raise RuntimeError("no usage chunk")
                ttfts.append(first if first is not None else float("nan"))
                tokens.append(usage["completion_tokens"])
            except Exception as e:  # counted and reported
                errors.append(repr(e))

    async def run():
        ttfts, errors, tokens = [], [], []
        limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(http, c, ttfts, errors, tokens) for c in range(n_clients)))
            wall = time.perf_counter() - t0
        done = len(ttfts)
        q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [float("nan")] * 19
        return {"clients": n_clients, "requests": done, "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
                "requests_per_s": done / wall, "ttft_p50_s": statistics.median(ttfts) if ttfts else float("nan"),
                "ttft_p95_s": q[18], "stream_tokens_per_s": sum(tokens) / wall}

    results.put(asyncio.run(run()))


if __name__ == "__main__":
    main()
