"""
The CORE metric of a checkpoint (and bits per byte on the val shards when they exist).

    python -m scripts.base_eval                          # latest base model, every CORE task
    python -m scripts.base_eval --max-per-task 100       # a quick look
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval
"""

import argparse
import csv
import os
import time

from nanochat.checkpoint import add_checkpoint_args, load_model
from nanochat.common import (FetchError, autocast_ctx, compute_cleanup, compute_init, get_base_dir, parse_dtype,
                             print0)
from nanochat.core_eval import evaluate_core
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes


def main(argv=None):
    p = argparse.ArgumentParser(description="CORE metric and bits per byte of a checkpoint.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="base")
    p.add_argument("--max-per-task", type=int, default=-1, help="first N items of each task (-1: all)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    p.add_argument("--bpb-tokens", type=int, default=0,
                   help="also evaluate val bits per byte on at most this many tokens, one pass at most (0: skip)")
    args = p.parse_args(argv)
    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast = autocast_ctx(device.type, parse_dtype(args.dtype, device.type))
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)

    t0 = time.time()
    try:
        with autocast:
            out = evaluate_core(model, tokenizer, max_per_task=args.max_per_task, batch_size=args.batch_size,
                                log=print0)
    except FetchError as e:  # offline without NANOCHAT_LOCAL_DATA: one line, not a traceback
        raise SystemExit(f"error: {e}")
    print0(f"CORE ({out['present']}/{out['total']} tasks): {out['core']:.4f}   [{time.time() - t0:.0f}s]")
    if out["absent"]:
        print0(f"absent (files not found): {', '.join(out['absent'])}")
    section = [{"source": args.source, "step": meta["step"], "max per task": args.max_per_task,
                "CORE": out["core"], "CORE tasks": f"{out['present']}/{out['total']}"},
               {label: r["centered"] for label, r in out["tasks"].items()}]
    if args.bpb_tokens > 0:
        T = model.config.sequence_len
        steps = max(1, args.bpb_tokens // (args.batch_size * T * world_size))
        try:
            loader = DataLoader(tokenizer, args.batch_size, T, "val", device, rank=rank, world_size=world_size,
                                loop=False)
            bpb, tokens = evaluate_bpb(model, loader, steps, get_token_bytes(device), autocast=autocast)
            print0(f"val bpb: {bpb:.4f} over {tokens:,} tokens")
            section[0]["val bpb"], section[0]["val tokens evaluated"] = bpb, tokens
        except FileNotFoundError as e:
            print0(f"no val bpb: {e}")
    if rank == 0:
        out_dir = os.path.join(get_base_dir(), "base_eval")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{args.source}_{meta['step']:06d}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "accuracy", "centered", "baseline", "n"])
            for label, r in out["tasks"].items():
                writer.writerow([label, f"{r['accuracy']:.6f}", f"{r['centered']:.6f}", r["baseline"], r["n"]])
            writer.writerow(["CORE", "", f"{out['core']:.6f}", "", ""])
        print0(f"results: {path}")
    get_report().log("Base model evaluation", section)
    compute_cleanup()


if __name__ == "__main__":
    main()
