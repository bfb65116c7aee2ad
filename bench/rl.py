"""
RL rollout throughput on this machine (depth-4 model, CPU), on real GSM8K train prompts:
- completions/s when the k samples of a prompt share one prefill and decode as one batch (the
  engine, as chat_rl runs it) vs the same k completions generated one at a time;
- the share of an RL step spent generating vs training (forward + backward + optimizer), at k = 4, 8.
The model is random and never stops early or calls the tool (every completion runs to
--max-new-tokens, the same work each time); rewards are synthetic (alternating 0/1) so every row trains: the slowest case
for the training half. The last line printed is one JSON object with every figure.

    python -m bench.rl
"""

import argparse
import json
import os
import time

import torch

from bench import data_dir, read_text
from nanochat.common import autocast_ctx, parse_dtype
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.rl import group_advantages, pg_micro_batches, rollout
from nanochat.schedule import peak_lrs
from nanochat.tokenizer import RustBPETokenizer
from nanochat.training import train_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--samples", type=int, nargs="+", default=[4, 8])
    p.add_argument("--prompts", type=int, default=2, help="prompts per measured step")
    p.add_argument("--steps", type=int, default=3, help="measured RL steps per k (after one warmup step)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default="auto")
    args = p.parse_args()
    data = data_dir(small_ok=True)
    os.environ["NANOCHAT_LOCAL_DATA"] = data
    from tasks.gsm8k import GSM8K
    torch.manual_seed(0)
    text = read_text(data, "pretrain", "tinyshakespeare", "input.txt")
    tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), args.vocab)
    model = GPT(config_for_depth(args.depth, tokenizer.get_vocab_size(), 1024, head_dim=64))
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    dtype = parse_dtype(args.dtype, "cpu")
    autocast = autocast_ctx("cpu", dtype)
    engine = Engine(model, tokenizer)
    engine.stop_ids, engine.python_start = set(), -1  # no early stops, no tool calls: equal work per completion
    optimizers = model.setup_optimizers(peak_lrs(model.config.n_embd, 0.001, 0.01, 0.0002), ns_dtype=dtype)
    task = GSM8K("main", "train")
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(args.prompts * (args.steps + 1) * 2)]
    print(f"depth {args.depth}, vocab {tokenizer.get_vocab_size()}, dtype {str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads, {args.max_new_tokens} new tokens per completion, "
          f"mean prompt {sum(map(len, prompts)) / len(prompts):.0f} tokens")
    results = {}
    for k in args.samples:
        gen_s = train_s = completions = 0.0
        for step in range(args.steps + 1):
            t0 = time.perf_counter()
            seqs, masks, advs = [], [], []
            for j in range(args.prompts):
                with autocast:
                    s, m, _ = rollout(engine, prompts[step * args.prompts + j], k, args.max_new_tokens, seed=step)
                seqs += s
                masks += m
                advs += group_advantages([i % 2 for i in range(k)]).tolist()
            t1 = time.perf_counter()
            batches = pg_micro_batches(seqs, masks, advs, tokenizer.get_bos_token_id(), 8)
            train_step(model, optimizers, batches, autocast)
            t2 = time.perf_counter()
            if step > 0:  # the first step warms up allocators and kernels
                gen_s += t1 - t0
                train_s += t2 - t1
                completions += len(seqs)
        # the same completions one at a time (no shared prefill, batch 1)
        t0 = time.perf_counter()
        for j in range(args.prompts):
            for i in range(k):
                with autocast:
                    rollout(engine, prompts[j], 1, args.max_new_tokens, seed=i)
        single_s = time.perf_counter() - t0
        results[k] = {"completions_per_s": completions / gen_s, "single_completions_per_s": args.prompts * k / single_s,
                      "gen_share": gen_s / (gen_s + train_s), "step_s": (gen_s + train_s) / args.steps}
    print()
    print("| k | completions/s (batched) | completions/s (one at a time) | ratio | step time | generation share |")
    print("|---|---|---|---|---|---|")
    for k, r in results.items():
        print(f"| {k} | {r['completions_per_s']:.2f} | {r['single_completions_per_s']:.2f} | "
              f"{r['completions_per_s'] / r['single_completions_per_s']:.2f}x | {r['step_s']:.1f} s | "
              f"{100 * r['gen_share']:.0f}% |")
    print(json.dumps({"depth": args.depth, "max_new_tokens": args.max_new_tokens, "dtype": str(dtype), "results": results}))


if __name__ == "__main__":
    main()
