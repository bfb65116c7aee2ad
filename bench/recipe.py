"""
The pretraining recipe at equal FLOPs: the classic recipe (Muon with Newton-Schulz, no weight decay,
momentum 0.85 -> 0.95, warmdown over the last 20% to 0) against each 2026 piece alone, all of them
together, and all but NorMuon (a leave-one-out), at depth 4 and 6, several seeds, on one pinned val
split. Every run is the real scripts.base_train (fp32, the same steps, batch and sequence length, so
the same FLOPs; the model seed changes). Prints val bpb per run, then per recipe the mean over seeds
with the spread, the change against classic, tokens/s and wall-clock.

    python -m bench.recipe                                     # depths 4 and 6, 3 seeds, 300 steps
    python -m bench.recipe --depths 4 --seeds 1 --steps 100 --recipes classic all   # a quick look
    python -m bench.recipe --jobs 2            # two runs at once, one thread each (more runs per hour)
    python -m bench.recipe --speed             # tokens/s only: each recipe in turn, alone, short runs
    python -m bench.recipe --suite architecture   # issue 22: each architecture addition on top of the 2026 recipe

With --jobs > 1 the runs share the CPU, so their tokens/s are not comparable: measure speed apart, with
--speed on an otherwise quiet machine (one run at a time, recipes alternated, 30 steps each, twice).

Data: the Gutenberg + WikiText-2 text of the full local copy ($NANOCHAT_LOCAL_DATA or ../shared/data),
shards and an 8192-token tokenizer built once into --work-dir (kept, so reruns skip it).
"""

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

from bench import REPO_ROOT, data_dir

CLASSIC = ["--orthogonalize", "newton_schulz", "--normuon-beta2", "0", "--muon-weight-decay", "0",
           "--weight-decay-schedule", "constant", "--momentum", "0.85", "0.95", "300", "--momentum-warmdown", "0.95", "--warmup-steps", "0",
           "--warmdown-ratio", "0.2", "--final-lr-frac", "0"]
# each 2026 piece, as flags on top of classic (the values named in issue 21: nanochat's and the papers')
PIECES = {
    "polar_express": ["--orthogonalize", "polar_express"],  # Amsel et al. 2025
    "normuon": ["--normuon-beta2", "0.9"],  # arXiv 2510.05491; beta2 0.9 as nanochat
    "cautious_wd": ["--muon-weight-decay", "0.2", "--weight-decay-schedule", "cosine"],  # arXiv 2510.12402, cosine to 0
    "momentum": ["--momentum", "0.85", "0.97", "400", "--momentum-warmdown", "0.90"],  # nanochat 2026
    "lr_schedule": ["--warmup-steps", "40", "--warmdown-ratio", "0.65", "--final-lr-frac", "0.05"],  # nanochat 2026
}


# issue 22's architecture additions, each as flags on top of the 2026 recipe ("all"; stage.add_architecture_args)
ADDITIONS = {
    "value_embeds": ["--value-embeds"],  # ResFormer's value residual (arXiv 2410.17897), modded-nanogpt's form
    "resid_mix": ["--resid-mix"],  # learnable residual / x0 mixing per layer
    "smear": ["--smear"],  # the previous token's embedding gated in
    "backout": ["--backout"],  # a learnable share of the mid-depth residual subtracted before the final norm
    "qk_scale": ["--qk-scale", "1.2"],  # attention logits x1.44 after QK-norm
    "rope_base": ["--rope-base", "100000"],
    "windows": ["--window-pattern", "SSSL"],  # short window = a quarter of the context, the last layer full
}
# an addition at other values than its flags' defaults: in the architecture suite, not in arch_all
VARIANTS = {
    "resid_mix_lr05": ["--resid-mix", "--scalar-lr", "0.5"],  # nanochat's scalar LR: x0 lambdas 0.5, residual 0.005
}
SUITES = {"recipe": "issue 21: classic vs each 2026 optimizer/schedule piece vs all of them",
          "architecture": "issue 22: the 2026 recipe (all) vs each architecture addition on top vs all of them"}


def recipes():
    out = {"classic": CLASSIC}
    out.update({name: CLASSIC + flags for name, flags in PIECES.items()})
    out["all"] = CLASSIC + [f for flags in PIECES.values() for f in flags]  # later flags win in argparse
    out["all_but_normuon"] = out["all"] + ["--normuon-beta2", "0"]  # leave-one-out: NorMuon's share of "all"
    out.update({f"arch_{name}": out["all"] + flags for name, flags in ADDITIONS.items()})
    def additions_but(*left_out):
        return out["all"] + [f for n, flags in ADDITIONS.items() if n not in left_out for f in flags]
    out["arch_all"] = additions_but()
    out["arch_all_but_resid_mix"] = additions_but("resid_mix")  # leave-one-out
    for name in ("backout", "rope_base"):  # ... and one more: arch_default_but_rope_base is speedrun.sh's set
        out[f"arch_default_but_{name}"] = additions_but("resid_mix", name)
    out.update({f"arch_{name}": out["all"] + flags for name, flags in VARIANTS.items()})
    return out


def suite_recipes(suite):
    """The recipes a suite compares, its baseline first."""
    names = list(recipes())
    if suite == "recipe":
        return names[:names.index("all_but_normuon") + 1]
    return ["all"] + [n for n in names if n.startswith("arch_")]


def py(argv, env, log=None):
    r = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r.stdout


def py_logged(argv, env, log):
    """Runs `python argv` with its output in `log`; returns its peak resident memory in MiB (this child's own,
    from wait4, so runs side by side do not mix)."""
    with open(log, "w") as f:
        child = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if child.returncode != 0:
        with open(log) as f:
            raise RuntimeError(f"{' '.join(argv[:3])} failed (see {log}):\n{f.read()[-3000:]}")
    return usage.ru_maxrss / 1024  # KiB on Linux


def prepare(work, env):
    """Shards and tokenizer in `work`, once."""
    if os.path.exists(os.path.join(work, "tokenizer")):
        return
    pretrain = os.path.join(data_dir(), "pretrain")
    py(["-m", "nanochat.dataset", "prepare", "--input", os.path.join(pretrain, "gutenberg"),
        os.path.join(pretrain, "wikitext-2-raw"), "--shard-chars", "20000000", "--val-chars", "500000"], env)
    py(["-m", "scripts.tok_train", "--vocab-size", "8192", "--max-chars", "20000000"], env)


def run(name, flags, depth, seed, ns, env):
    """One base_train run -> {val_bpb, tokens_per_s, wall_s}; a run with the same command already in --work-dir is
    reused unless --fresh (its result file records the command)."""
    tag = f"{name}-d{depth}-s{seed}"
    metrics = os.path.join(ns.work_dir, "base_checkpoints", tag, "metrics.jsonl")
    argv = ["-m", "scripts.base_train", "--depth", str(depth), "--head-dim", "64", "--max-seq-len", str(ns.seq),
            "--device-batch-size", str(ns.batch_tokens // ns.seq), "--total-batch-size", str(ns.batch_tokens),
            "--num-iterations", str(ns.steps), "--dtype", "float32", "--eval-every", "-1", "--eval-tokens", "100000000",
            "--sample-every", "-1", "--save-every", "-1", "--seed", str(seed), "--model-tag", tag, *flags]
    saved = os.path.join(ns.work_dir, f"{tag}.json")
    if not ns.fresh and os.path.exists(saved):
        with open(saved) as f:
            done = json.load(f)
        if done["argv"] == argv:
            return dict(done["result"], cached=True)
    if os.path.exists(metrics):
        os.remove(metrics)
    t0 = time.time()
    if ns.jobs > 1:  # each run gets its share of the cores; val bpb does not depend on it beyond rounding
        env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // ns.jobs)))
    peak_mib = py_logged(argv, env, os.path.join(ns.work_dir, f"{tag}.log"))
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    steps = [r for r in records if "tokens_per_s" in r][5:]  # past the first steps' warm-up
    result = {"val_bpb": [r["val_bpb"] for r in records if "val_bpb" in r][-1], "wall_s": time.time() - t0,
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps) if steps else float("nan"),
              "jobs": ns.jobs, "peak_rss_mib": peak_mib}
    with open(saved, "w") as f:
        json.dump({"argv": argv, "result": result}, f)
    return result


def speed(names, depth, ns, env, steps=30, rounds=2):
    """Median tokens/s of each recipe over `rounds` short runs, recipes alternated, one run at a time (all cores):
    what the optimizer pieces cost per token, free of other runs sharing the CPU."""
    samples = {name: [] for name in names}
    quick = argparse.Namespace(**{**vars(ns), "steps": steps, "fresh": True, "jobs": 1})
    for _ in range(rounds):
        for name in names:
            samples[name].append(run(name, recipes()[name], depth, 0, quick, env)["tokens_per_s"])
    return {name: statistics.median(v) for name, v in samples.items()}


def main():
    all_recipes = recipes()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[4, 6])
    p.add_argument("--seeds", type=int, default=3, help="model seeds per recipe (1, 2, ...)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=4096, help="tokens per step")
    p.add_argument("--suite", default="recipe", choices=list(SUITES), help="; ".join(f"{k}: {v}" for k, v in SUITES.items()))
    p.add_argument("--recipes", nargs="+", choices=list(all_recipes), help="these recipes (default: the suite's; "
                   "the first is the baseline)")
    p.add_argument("--work-dir", default=os.path.join(REPO_ROOT, ".bench_recipe"), help="shards, tokenizer, runs")
    p.add_argument("--fresh", action="store_true", help="rerun runs whose results are already in --work-dir")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, the cores shared between them")
    p.add_argument("--speed", action="store_true", help="only tokens/s per recipe: short runs alone, alternated")
    ns = p.parse_args()
    if ns.jobs < 1:
        p.error("--jobs must be >= 1")
    ns.recipes = ns.recipes or suite_recipes(ns.suite)
    os.makedirs(ns.work_dir, exist_ok=True)
    env = dict(os.environ, NANOCHAT_BASE_DIR=ns.work_dir)
    prepare(ns.work_dir, env)
    import torch
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seq {ns.seq}, {ns.batch_tokens} tokens/step, "
          f"{ns.steps} steps, fp32; seeds 1..{ns.seeds}", flush=True)
    if ns.speed:
        print("| depth | recipe | tokens/s (median of 2 alternated 30-step runs, alone) | vs " + ns.recipes[0] + " |")
        print("|---:|---|---:|---:|")
        for depth in ns.depths:
            tps = speed(ns.recipes, depth, ns, env)
            for name in ns.recipes:
                print(f"| {depth} | {name} | {tps[name]:,.0f} | {tps[name] / tps[ns.recipes[0]]:.2f}x |", flush=True)
        return
    results = {}
    todo = [(depth, name, seed) for depth in ns.depths for name in ns.recipes for seed in range(1, ns.seeds + 1)]

    def one(key):
        depth, name, seed = key
        r = results[key] = run(name, all_recipes[name], depth, seed, ns, env)
        line = (f"  d{depth} {name:14s} seed {seed}: val bpb {r['val_bpb']:.4f}, {r['tokens_per_s']:,.0f} tok/s, "
                f"{r['wall_s']:.0f} s{' (an earlier run)' if r.get('cached') else ''}\n")
        sys.stdout.write(line)  # one write: print's separate newline interleaves between the pool's threads
        sys.stdout.flush()

    with concurrent.futures.ThreadPoolExecutor(ns.jobs) as pool:
        for f in [pool.submit(one, key) for key in todo]:
            f.result()
    print()
    print(f"tokens/s: median of each run's steps ({ns.jobs} run(s) at once; comparable only with --jobs 1 on a quiet "
          f"machine, else see --speed)")
    baseline = ns.recipes[0]
    print(f"| depth | recipe | val bpb (mean of seeds) | spread (max - min) | vs {baseline} | tokens/s | vs {baseline} "
          f"| peak RSS MiB | wall s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for depth in ns.depths:
        def summary(name):
            runs = [results[(depth, name, s)] for s in range(1, ns.seeds + 1)]
            bpb = [r["val_bpb"] for r in runs]
            tps = statistics.mean(r["tokens_per_s"] for r in runs)
            peaks = [r["peak_rss_mib"] for r in runs if "peak_rss_mib" in r]  # runs before it was recorded have none
            return (statistics.mean(bpb), max(bpb) - min(bpb), tps, f"{max(peaks):,.0f}" if peaks else "-",
                    statistics.mean(r["wall_s"] for r in runs))
        base = summary(baseline)
        for name in ns.recipes:
            bpb, spread, tps, peak, wall = summary(name)
            print(f"| {depth} | {name} | {bpb:.4f} | {spread:.4f} | {bpb - base[0]:+.4f} | {tps:,.0f} | {tps / base[2]:.2f}x "
                  f"| {peak} | {wall:.0f} |")


if __name__ == "__main__":
    main()
