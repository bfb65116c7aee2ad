"""
Training throughput on this machine: tokens/s and achieved FLOP/s of a full training step (forward,
backward, Muon + AdamW) against the matmul peak measured in the same process for the dtype used
(= MFU), fp32 vs bf16 autocast, eager vs torch.compile, peak RSS; then a quality check: val bpb
after the same number of real training steps (scripts.base_train on real text) in fp32 and bf16.

    python -m bench.train                      # depths 4 and 6, seq 512
    python -m bench.train --depths 4 --steps 5 --quality-steps 0     # quick look

Each configuration runs in a fresh subprocess (its own peak RSS, its own compile cache).
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from bench import data_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args):
    """Time `steps` training steps of one configuration; print one JSON line."""
    import torch
    from nanochat.common import autocast_ctx, measure_matmul_peak
    from nanochat.gpt import GPT, config_for_depth
    from nanochat.training import train_step
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device("cpu")
    peak = measure_matmul_peak(device, dtype)
    config = config_for_depth(args.depth, args.vocab, args.seq, head_dim=args.head_dim)
    model = GPT(config)
    model.init_weights()
    optimizers = model.setup_optimizers(ns_dtype=dtype)
    train_model = torch.compile(model, dynamic=False) if args.compile else model
    autocast = autocast_ctx("cpu", dtype)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))

    def step():  # the step scripts.base_train takes (nanochat.training.train_step), one micro-batch
        return train_step(train_model, optimizers, [(x, y)], autocast)[0]

    t0 = time.perf_counter()
    for _ in range(args.warmup):  # includes compilation
        step()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    dt = (time.perf_counter() - t0) / args.steps
    tokens_per_s = args.batch * args.seq / dt
    flops = model.estimate_flops() * tokens_per_s
    print(json.dumps({"depth": args.depth, "dtype": args.dtype, "compile": args.compile, "params": model.num_params(),
                      "tokens_per_s": tokens_per_s, "flops": flops, "peak": peak, "mfu": flops / peak,
                      "warmup_s": warmup_s, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_worker(depth, dtype, compile_, ns):
    cmd = [sys.executable, "-m", "bench.train", "--worker", "--depth", str(depth), "--dtype", dtype,
           "--seq", str(ns.seq), "--batch", str(ns.batch), "--steps", str(ns.steps), "--warmup", str(ns.warmup),
           "--vocab", str(ns.vocab), "--head-dim", str(ns.head_dim)] + (["--compile"] if compile_ else [])
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"worker {depth}/{dtype}/{compile_} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def quality(ns):
    """val bpb of scripts.base_train after the same steps on the same real data, fp32 vs bf16."""
    base = tempfile.mkdtemp(prefix="nanochat_bench_")
    env = dict(os.environ, NANOCHAT_BASE_DIR=base)
    try:
        def py(*argv):
            r = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{argv} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
            return r.stdout
        pretrain = os.path.join(data_dir(), "pretrain")
        py("-m", "nanochat.dataset", "prepare", "--input", os.path.join(pretrain, "gutenberg"),
           os.path.join(pretrain, "wikitext-2-raw"), "--shard-chars", "20000000", "--val-chars", "500000")
        py("-m", "scripts.tok_train", "--vocab-size", "8192", "--max-chars", "20000000")
        results = {}
        for dtype in ("fp32", "bf16"):
            t0 = time.time()
            py("-m", "scripts.base_train", "--depth", "4", "--head-dim", "64", "--max-seq-len", str(ns.seq),
               "--device-batch-size", "8", "--total-batch-size", str(8 * ns.seq), "--num-iterations",
               str(ns.quality_steps), "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[dtype],
               "--eval-every", "-1", "--eval-tokens", str(64 * ns.seq), "--sample-every", "-1",
               "--save-every", "-1", "--model-tag", dtype)
            with open(os.path.join(base, "base_checkpoints", dtype, "metrics.jsonl")) as f:
                records = [json.loads(line) for line in f]
            results[dtype] = {"val_bpb": [r["val_bpb"] for r in records if "val_bpb" in r][-1],
                              "loss": [r["smooth_loss"] for r in records if "loss" in r][-1],
                              "wall_s": time.time() - t0}
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6], help="model depths to time")
    p.add_argument("--seq", type=int, default=512, help="sequence length")
    p.add_argument("--batch", type=int, default=8, help="rows per step")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (random tokens; the CPU profile's size)")
    p.add_argument("--head-dim", type=int, default=64, help="attention head dim (the tiny CPU profile's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--quality-steps", type=int, default=100, help="real training steps for the fp32-vs-bf16 bpb check (0: skip)")
    ns = p.parse_args()
    if ns.worker:
        worker(ns)
        return

    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, seq {ns.seq}, batch {ns.batch}, "
          f"vocab {ns.vocab}, head_dim {ns.head_dim}")
    rows = []
    for depth in ns.depths:
        for dtype in ("fp32", "bf16"):
            for compile_ in (False, True):
                r = run_worker(depth, dtype, compile_, ns)
                rows.append(r)
                print(f"  depth {depth} {dtype} {'compile' if compile_ else 'eager'}: {r['tokens_per_s']:,.0f} tok/s, "
                      f"MFU {100 * r['mfu']:.1f}%", flush=True)
    print()
    print("| depth | params | dtype | mode | tokens/s | achieved GFLOP/s | matmul peak GFLOP/s | MFU | peak RSS MB |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['depth']} | {r['params'] / 1e6:.1f}M | {r['dtype']} | {'compile' if r['compile'] else 'eager'} | "
              f"{r['tokens_per_s']:,.0f} | {r['flops'] / 1e9:.0f} | {r['peak'] / 1e9:.0f} | {100 * r['mfu']:.1f}% | {r['rss_mb']:.0f} |")
    print()
    by = {(r["depth"], r["dtype"], r["compile"]): r for r in rows}
    print("| depth | bf16 / fp32 tokens/s (eager) | bf16 / fp32 (compiled) | compile / eager (bf16) | compile / eager (fp32) |")
    print("|---:|---:|---:|---:|---:|")
    for depth in ns.depths:
        t = lambda dt, c: by[(depth, dt, c)]["tokens_per_s"]
        print(f"| {depth} | {t('bf16', False) / t('fp32', False):.2f}x | {t('bf16', True) / t('fp32', True):.2f}x | "
              f"{t('bf16', True) / t('bf16', False):.2f}x | {t('fp32', True) / t('fp32', False):.2f}x |")
    if ns.quality_steps > 0:
        q = quality(ns)
        print()
        print(f"quality: depth 4, seq {ns.seq}, {ns.quality_steps} steps of {8 * ns.seq} tokens on real text (scripts.base_train)")
        print("| dtype | final val bpb | final train loss | wall s |")
        print("|---|---:|---:|---:|")
        for dtype, r in q.items():
            print(f"| {dtype} | {r['val_bpb']:.4f} | {r['loss']:.4f} | {r['wall_s']:.0f} |")
        print(f"bf16 val bpb / fp32 val bpb = {q['bf16']['val_bpb'] / q['fp32']['val_bpb']:.4f}")


if __name__ == "__main__":
    main()
