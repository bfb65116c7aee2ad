"""
Bits per byte of a checkpoint on the train and val shards, plus a few greedy samples.

    python -m scripts.base_loss                       # latest base model
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --split-tokens 20971520
"""

import argparse

import torch

from nanochat.checkpoint import add_checkpoint_args, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, parse_dtype, print0
from nanochat.dataloader import DataLoader
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
           "The opposite of hot is", "My favorite color is"]


def main(argv=None):
    p = argparse.ArgumentParser(description="Bits per byte on the train and val shards, and samples.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="base")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward pass")
    p.add_argument("--split-tokens", type=int, default=20 * 524288,
                   help="tokens to evaluate per split, at most (never more than one pass of the split)")
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    args = p.parse_args(argv)
    print0(f"flags: {vars(args)}")

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast = autocast_ctx(device.type, parse_dtype(args.dtype, device.type))
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    T = args.max_seq_len or model.config.sequence_len
    token_bytes = get_token_bytes(device=device)
    steps = max(1, args.split_tokens // (args.device_batch_size * T * world_size))

    results = {}
    for split in ("train", "val"):
        loader = DataLoader(tokenizer, args.device_batch_size, T, split, device, rank=rank, world_size=world_size,
                            loop=False)
        bpb, tokens = evaluate_bpb(model, loader, steps, token_bytes, autocast=autocast)
        results[f"{split} bpb"], results[f"{split} tokens evaluated"] = bpb, tokens
        print0(f"{split} bpb: {bpb:.4f} over {tokens:,} tokens")

    samples = []
    if rank == 0:
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                out = list(model.generate(ids, max_tokens=16, temperature=0))
            text = prompt + tokenizer.decode(out)
            samples.append(text)
            print0(f"sample: {text!r}")
    get_report().log("Base model loss", [{"source": args.source, "step": meta["step"], **results},
                                         "samples:", *[f"    {s!r}" for s in samples]])
    compute_cleanup()


if __name__ == "__main__":
    main()
