"""
Decoding speed on this machine, depth-4 model, CPU:
- KV-cached decode (the Engine) vs recomputing the whole sequence every step (GPT.generate), at
  prompt + output lengths 128 and 1024 (half prompt, half output);
- 1 row vs 8 rows from one prefill (tokens/s per row and in total);
- memory bandwidth achieved by batch-1 decode (weights + KV cache read per token) against a copy
  bandwidth measured in the same run (MBU);
- the static-cache decode step of continuous batching (BatchScheduler), eager and compiled, with 1
  and 8 concurrent requests, against the Engine's eager batch-1 decode;
- each weight matrix as a decode GEMM on one thread, 1 row vs 8 (torch's linear, MKL with the weight
  packed once, weight-only int8): what bounds the step on a CPU.
- the architecture additions (issue 22: value embeddings, resid mix, smear, backout, qk scale, SSSL
  windows, all on) against the plain model of the same size: Engine decode at 1 and 8 rows and the
  scheduler's eager step with 8 requests, the two models alternated (windows and smear in the cache path).
The last line printed is one JSON object with every figure.

    python -m bench.inference
    python -m bench.inference --additions-only     # just the last table
"""

import argparse
import json
import time

import torch

from bench import data_dir, read_text
from nanochat.batching import BatchScheduler
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_for_depth
from nanochat.tokenizer import RustBPETokenizer



def copy_bandwidth(mb=512, reps=5):
    """Bytes moved per second by a large tensor copy (read + write), the practical ceiling for decode."""
    src = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best


def random_model(args, tokenizer, **architecture):
    """A random but not degenerate model at --depth (seeded: the same draws for every architecture)."""
    torch.manual_seed(0)
    model = GPT(config_for_depth(args.depth, tokenizer.get_vocab_size(), max(args.lengths), head_dim=64, **architecture))
    model.init_weights()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
        if model.resid_lambdas is not None:  # a residual stream scaled by ~0 each layer would be degenerate
            model.resid_lambdas.fill_(1.0)
        specials = [tokenizer.encode_special(s) for s in tokenizer.get_special_tokens()]
        model.lm_head.weight[specials] = 0  # keep greedy decoding away from stop/tool tokens
    return model.eval()


ALL_ADDITIONS = dict(value_embeds=True, resid_mix=True, smear=True, backout=True, qk_scale=1.2, rope_base=100000.0,
                     window_pattern="SSSL")


def additions_table(tokenizer, text, args, rounds=3):
    """Decode tok/s of the plain model vs the one with every addition on (same size), alternated `rounds` times,
    best of each: Engine at 1 and --rows rows, and the scheduler's eager step with --rows requests."""
    length = max(args.lengths)
    prompt = tokenizer.encode(text[:20 * length], prepend="<|bos|>")[:length // 2]
    n_out = length - len(prompt)
    models = {"plain": random_model(args, tokenizer), "all additions": random_model(args, tokenizer, **ALL_ADDITIONS)}
    best = {name: {} for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            engine = Engine(model, tokenizer, calculator=lambda e: "0")
            for rows in (1, args.rows):
                t0 = time.perf_counter()
                out, _ = engine.generate_batch(prompt, num_samples=rows, max_tokens=n_out, temperature=0)
                assert all(len(r) == len(prompt) + n_out for r in out), "a row stopped early"
                best[name][f"engine_{rows}"] = max(best[name].get(f"engine_{rows}", 0), rows * n_out / (time.perf_counter() - t0))
            scheduler = BatchScheduler(engine, slots=args.rows, max_len=len(prompt) + n_out + 8, compile="off")
            t0 = time.perf_counter()
            reqs = [scheduler.submit(prompt, max_tokens=n_out, temperature=0) for _ in range(args.rows)]
            assert all(sum(1 for _ in r) == n_out for r in reqs), "a request stopped early"
            best[name]["scheduler"] = max(best[name].get("scheduler", 0), args.rows * n_out / (time.perf_counter() - t0))
            scheduler.close()
    print(f"\narchitecture additions (all on, SSSL windows of {length // 4}) vs plain, depth {args.depth}, "
          f"{len(prompt)}-token prompt + {n_out} tokens; best of {rounds}, alternated")
    print(f"| decode | plain tok/s | all additions tok/s | ratio |")
    print("|---|---:|---:|---:|")
    for key, label in (("engine_1", "Engine, 1 row"), (f"engine_{args.rows}", f"Engine, {args.rows} rows"),
                       ("scheduler", f"scheduler (eager), {args.rows} requests")):
        a, b = best["plain"][key], best["all additions"][key]
        print(f"| {label} | {a:.0f} | {b:.0f} | {b / a:.2f}x |", flush=True)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--additions-only", action="store_true", help="only the architecture additions' decode table")
    args = p.parse_args()
    torch.manual_seed(0)
    text = read_text(data_dir(small_ok=True), "pretrain", "tinyshakespeare", "input.txt")
    tokenizer = RustBPETokenizer.train_from_iterator(iter([text[i:i + 2000] for i in range(0, len(text), 2000)]), args.vocab)
    if args.additions_only:
        print(json.dumps({"additions": additions_table(tokenizer, text, args)}))
        return
    model = random_model(args, tokenizer)
    config = model.config
    engine = Engine(model, tokenizer, calculator=lambda e: "0")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth()
    results = {"depth": args.depth, "params": model.num_params(), "threads": torch.get_num_threads(),
               "copy_bandwidth_gb_s": bandwidth / 1e9}

    def timed_engine(prompt, n_out, rows):
        t0 = time.perf_counter()
        out, _ = engine.generate_batch(prompt, num_samples=rows, max_tokens=n_out, temperature=0)
        dt = time.perf_counter() - t0
        assert all(len(r) == len(prompt) + n_out for r in out), "a row stopped early"
        return dt

    print(f"depth {args.depth}, {model.num_params() / 1e6:.1f}M params, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| length | cached tok/s | recompute tok/s | speed-up | 1 row tok/s | 8 rows tok/s/row | 8 rows total | 8-row step time / 1-row | decode MBU |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for length in args.lengths:
        prompt = tokenizer.encode(text[:20 * length], prepend="<|bos|>")[:length // 2]
        n_out = length - len(prompt)
        timed_engine(prompt, 4, 1)  # warm up
        cached = timed_engine(prompt, n_out, 1)
        t0 = time.perf_counter()
        with torch.no_grad():
            recomputed = list(model.generate(prompt, max_tokens=n_out, temperature=0))
        recompute = time.perf_counter() - t0
        assert len(recomputed) == n_out
        batched = timed_engine(prompt, n_out, args.rows)
        # bytes read per decode step at batch 1: every weight once + the KV cache so far (fp32)
        c = config
        kv_per_token = 2 * c.n_layer * c.n_kv_head * (c.n_embd // c.n_head) * 4
        mean_context = len(prompt) + n_out / 2
        bytes_per_step = weight_bytes + kv_per_token * mean_context
        mbu = bytes_per_step * n_out / cached / bandwidth
        row = {"cached_tok_s": n_out / cached, "recompute_tok_s": n_out / recompute, "speedup": recompute / cached,
               "rows": args.rows, "batched_tok_s_per_row": n_out / batched, "batched_tok_s_total": args.rows * n_out / batched,
               "batched_time_ratio": batched / cached, "mbu": mbu}
        results[f"length_{length}"] = row
        print(f"| {length} | {row['cached_tok_s']:.0f} | {row['recompute_tok_s']:.0f} | {row['speedup']:.1f}x | "
              f"{row['cached_tok_s']:.0f} | {row['batched_tok_s_per_row']:.0f} | {row['batched_tok_s_total']:.0f} | "
              f"{row['batched_time_ratio']:.2f}x | {100 * mbu:.0f}% |", flush=True)
    results["scheduler"] = scheduler_table(engine, tokenizer, text, args, results)
    results["gemm"] = gemm_table(model, args.rows)
    results["additions"] = additions_table(tokenizer, text, args)
    print(json.dumps(results))


def scheduler_table(engine, tokenizer, text, args, results):
    """Requests of 1 row through BatchScheduler: 1 alone, then `rows` at once; eager and compiled step."""
    prompt = tokenizer.encode(text[:4000], prepend="<|bos|>")[:64]
    n_out = 192
    out = {}
    print()
    print(f"static-cache decode (BatchScheduler, {args.rows} slots, {n_out} tokens per request after a {len(prompt)}-token prompt)")
    print("| step | requests | ms/step | tok/s total | vs Engine eager 1 row | step time vs 1 request |")
    print("|---|---:|---:|---:|---:|---:|")
    t0 = time.perf_counter()
    engine.generate_batch(prompt, max_tokens=n_out, temperature=0)
    engine_step = (time.perf_counter() - t0) / n_out
    print(f"| Engine (eager, growing cache) | 1 | {engine_step * 1e3:.2f} | {1 / engine_step:.0f} | 1.00x | - |")
    for mode in ("off", "on"):
        scheduler = BatchScheduler(engine, slots=args.rows, max_len=len(prompt) + n_out + 8, compile=mode)
        # warm up, and compile every (rows, span) shape the timed runs will meet, outside the timing
        list(scheduler.submit(prompt, max_tokens=n_out, temperature=0))
        if args.rows > 1:
            for r in [scheduler.submit(prompt, max_tokens=n_out, temperature=0) for _ in range(args.rows)]:
                list(r)
        one = None
        for k in (1, args.rows):
            t0 = time.perf_counter()
            reqs = [scheduler.submit(prompt, max_tokens=n_out, temperature=0) for _ in range(k)]
            for r in reqs:
                assert sum(1 for _ in r) == n_out, "a request stopped early"
            step = (time.perf_counter() - t0) / n_out
            one = one or step
            name = "compiled" if mode == "on" else "eager"
            out[f"{name}_{k}"] = {"ms_per_step": step * 1e3, "tok_s": k / step, "step_speed_vs_engine": engine_step / step,
                                  "step_vs_one": step / one}
            print(f"| scheduler {name} | {k} | {step * 1e3:.2f} | {k / step:.0f} | {engine_step / step:.2f}x "
                  f"(per row: {engine_step * k / step:.2f}x) | {step / one:.2f}x |", flush=True)
        scheduler.close()
    return out


def gemm_table(model, rows, reps=200):
    """
    What bounds the decode step on a CPU: each weight matrix of the model as one decode GEMM, on one thread
    (the scheduler's), at 1 row and at `rows` rows: torch's linear; MKL with the weight packed once
    (torch's linear packs it again on every call with more than one row); and weight-only int8 with bf16
    activations (a quarter of the bytes; it changes the numbers, so it is measured here, not used).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes.setdefault(tuple(module.weight.shape), []).append(name)

    def best_us(fn):
        for _ in range(10):
            fn()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best * 1e6

    out = []
    print()
    print(f"decode GEMMs, one thread: every weight shape of the model, 1 row vs {rows} rows")
    print(f"| weight (out x in) | count | linear 1 row us | linear {rows} rows us | {rows} rows / 1 | MKL packed {rows} rows us | packed {rows} / linear 1 | packed bytes / weight | int8 weights, 1 row us |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = {"one": 0.0, "many": 0.0, "packed": 0.0}
    with torch.inference_mode():
        for (n_out, n_in), names in sorted(shapes.items()):
            w = torch.randn(n_out, n_in) * 0.02
            x1, xr = torch.randn(1, n_in), torch.randn(rows, n_in)
            one = best_us(lambda: torch.nn.functional.linear(x1, w))
            many = best_us(lambda: torch.nn.functional.linear(xr, w))
            packed = int8 = packed_size = float("nan")
            try:  # torch's MKL ops (the ones inductor's freezing uses on a CPU); absent in builds without MKL
                pw = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                packed = best_us(lambda: torch.ops.mkl._mkl_linear(xr, pw, w, None, rows))
                packed_size = pw.numel() * pw.element_size() / (w.numel() * w.element_size())
            except (AttributeError, RuntimeError):
                pass
            try:
                scales = w.abs().amax(dim=1) / 127
                wq = (w / scales[:, None]).round().to(torch.int8)
                xb, sb = x1.bfloat16(), scales.bfloat16()
                int8 = best_us(lambda: torch.ops.aten._weight_int8pack_mm(xb, wq, sb))
            except (AttributeError, RuntimeError):
                pass
            k = len(names)
            total["one"] += k * one
            total["many"] += k * many
            total["packed"] += k * (packed if packed == packed else many)
            out.append({"shape": [n_out, n_in], "count": k, "linear_1_us": one, f"linear_{rows}_us": many,
                        f"mkl_packed_{rows}_us": packed, "packed_size_ratio": packed_size, "int8_1_us": int8})
            print(f"| {n_out} x {n_in} | {k} | {one:.0f} | {many:.0f} | {many / one:.2f}x | {packed:.0f} | "
                  f"{packed / one:.2f}x | {packed_size:.1f}x | {int8:.0f} |", flush=True)
    print(f"| all, per step | {sum(len(v) for v in shapes.values())} | {total['one']:.0f} | {total['many']:.0f} | "
          f"{total['many'] / total['one']:.2f}x | {total['packed']:.0f} | {total['packed'] / total['one']:.2f}x | | |")
    torch.set_num_threads(threads)
    return {"shapes": out, "per_step_us": total}


if __name__ == "__main__":
    main()
