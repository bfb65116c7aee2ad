"""
Evaluation speed on this machine: CORE items/s on a depth-4 model (CPU), batched scoring vs one
sequence per forward pass; HumanEval programs/s in the sandbox with 1 and 2 workers (the canonical
solutions, so every program runs its full tests). The last line is a JSON object with every figure.

    python -m bench.eval
"""

import argparse
import json
import os
import time

import torch

from bench import data_dir, read_text
from nanochat.core_eval import CORE_TASKS, evaluate_task, load_rows
from nanochat.sandbox import execute_many
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import RustBPETokenizer



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=40, help="items per CORE task")
    p.add_argument("--tasks", default="copa,arc_easy,winograd,lambada_openai,piqa", help="CORE task labels")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    data = data_dir(small_ok=True)
    text = read_text(data, "pretrain", "tinyshakespeare", "input.txt")
    tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), 4096)
    torch.manual_seed(0)
    model = GPT(config_for_depth(4, tokenizer.get_vocab_size(), 512, head_dim=64))
    model.init_weights()
    model.eval()
    spec = {label: (rel, kind, shots, delim) for label, rel, kind, shots, delim, _ in CORE_TASKS}
    labels = [l for l in args.tasks.split(",") if os.path.exists(os.path.join(data, "core", spec[l][0]))]
    if labels != args.tasks.split(","):
        print(f"note: CORE tasks without a file here are left out; measuring {','.join(labels)}")
    results = {}
    print("| CORE scoring | items | seconds | items/s |")
    print("|---|---:|---:|---:|")
    for mode, batch in (("batched", args.batch_size), ("one at a time", 1)):
        total_items, t0 = 0, time.perf_counter()
        for label in labels:
            rel, kind, shots, delim = spec[label]
            rows = load_rows(os.path.join(data, "core", rel))
            indices = list(range(min(args.items, len(rows))))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                evaluate_task(model, tokenizer, rows, kind, shots, delim, 512, indices, batch_size=batch)
            total_items += len(indices)
        dt = time.perf_counter() - t0
        results[f"core_items_per_s_{mode.replace(' ', '_')}"] = total_items / dt
        print(f"| {mode} | {total_items} | {dt:.1f} | {total_items / dt:.1f} |", flush=True)
    problems = [json.loads(line) for line in read_text(data, "humaneval", "HumanEval.jsonl.gz").splitlines()]
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n" for p in problems]
    print()
    print("| HumanEval sandbox | programs | seconds | programs/s | passed |")
    print("|---|---:|---:|---:|---:|")
    for workers in (1, 2):
        t0 = time.perf_counter()
        out = execute_many(programs, workers=workers, timeout=10)
        dt = time.perf_counter() - t0
        results[f"humaneval_programs_per_s_{workers}_workers"] = len(programs) / dt
        print(f"| {workers} worker(s) | {len(programs)} | {dt:.1f} | {len(programs) / dt:.1f} | {sum(r.success for r in out)} |", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
