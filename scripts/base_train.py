"""
Pretrain the base model on the shards.

    python -m scripts.base_train --depth 4 --max-seq-len 256 --device-batch-size 8 --total-batch-size 4096
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- --depth 20
    python -m scripts.base_train --depth 20 --dry-run --assume-device h100     # what would it cost?

One process or many (torchrun: NCCL on GPUs, gloo on CPUs), the same code: the optimizers average
gradients across ranks themselves, so the model is not wrapped in DDP. Each step is
total_batch_size tokens = device_batch_size * max_seq_len * world_size * grad_accum_steps.
The data of micro-step k on rank r comes from reader r * grad_accum_steps + k of
world_size * grad_accum_steps, so the same total batch sees the same tokens however it is split
between ranks and accumulation steps.

Checkpoints go to base_checkpoints/<model_tag>/ every --save-every steps, at the end, at
--stop-after-step, and on SIGTERM/SIGINT; --resume continues the latest one exactly (model,
optimizer shards, every reader's position, step, schedule, loop statistics).
"""

import argparse
import os
import resource
import time
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from nanochat.common import (GPU_BF16_PEAK, compute_cleanup, get_base_dir, gpu_peak_flops, measure_matmul_peak,
                             print0)
from nanochat.dataloader import DataLoader
from nanochat.dataset import REMOTE_SHARD_CHARS, list_shards, shard_chars, shards_needed
from nanochat.fp8 import maybe_enable_fp8
from nanochat.gpt import GPT, config_for_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.schedule import (REFERENCE_DEPTH, add_recipe_args, auto_batch_size, base_schedule, batch_lr_scale,
                               batch_weight_decay_scale, peak_lrs)
from nanochat.stage import (LoopState, StageLog, StopRequest, add_architecture_args, add_loop_args, add_lr_args,
                            architecture_fields, due, init_stage, optimizer_recipe, resume_run, save_stage)
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.training import train_step

@dataclass
class BaseState(LoopState):
    val_bpb: float | None = None  # the last evaluation's
    min_val_bpb: float | None = None


# a --resume must keep these flags: they decide which data each step sees
RESUME_FLAGS = ("total_batch_size", "max_seq_len", "device_batch_size")


SAMPLE_PROMPTS = ["The capital of France is", "The chemical symbol of gold is", "If yesterday was Friday, then tomorrow will be",
                  "The opposite of hot is", "The planets of the solar system are:"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the base GPT on the shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device-type", default=None, choices=["cuda", "mps", "cpu"], help="default: autodetect")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, and on CPUs whose bf16 matmuls measure faster), float32 or bfloat16")
    # model
    p.add_argument("--depth", type=int, default=20, help="number of layers; width, heads and LRs follow from it")
    p.add_argument("--head-dim", type=int, default=128, help="attention head dimension")
    p.add_argument("--aspect-ratio", type=int, default=64, help="model_dim = aspect_ratio * depth, rounded up to head_dim")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length")
    add_architecture_args(p)
    # horizon: the first of these that is set wins
    p.add_argument("--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the ratio below)")
    # 10.5: nanochat's compute-optimal ratio from its 2026 scaling-law sweeps (d10-d20 at 1e18-1e19 FLOPs, dev/LOG.md
    # 2026-01-27), counting the parameters as here; Chinchilla's 20 counts every parameter
    p.add_argument("--target-param-data-ratio", type=float, default=10.5,
                   help="training tokens per scaling parameter (block matrices + lm_head, not the embedding)")
    # batch
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per device")
    p.add_argument("--total-batch-size", type=int, default=-1,
                   help="tokens per optimizer step, all ranks; -1: from the model size (the batch rule in "
                        "nanochat/schedule.py: 2^19 at depth 12, growing as D^0.383 of the training tokens; the LRs "
                        "then scale by sqrt(batch / 2^19))")
    # optimization
    add_lr_args(p)
    add_recipe_args(p)
    # evaluation, sampling, checkpoints
    p.add_argument("--eval-every", type=int, default=250, help="val bpb every N steps (and at the end; -1: end only)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288,
                   help="val tokens per evaluation, at most (never more than one pass of the val split)")
    p.add_argument("--sample-every", type=int, default=2000, help="print samples every N steps (-1: end only)")
    p.add_argument("--model-tag", default=None, help="checkpoint folder name (default: d<depth>)")
    p.add_argument("--log-every", type=int, default=1, help="print/log metrics every N steps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    p.add_argument("--fp8", action="store_true", help="float8 matmuls in the blocks' linears (nanochat/fp8.py; CUDA "
                   "compute capability 8.9+: H100/H200, L4, RTX 4090); master weights and checkpoints unchanged")
    p.add_argument("--log-data-checksum", action="store_true",
                   help="debug: log a checksum of each step's tokens (one more all-reduce per step; the tests "
                        "compare it between runs to prove that resumes and rank splits see the same data)")
    add_loop_args(p, "base", save_every=1000, seed=42, seed_help="model init seed")
    # planning
    p.add_argument("--dry-run", action="store_true", help="print sizes, budget, memory and time estimates, then exit")
    p.add_argument("--assume-device", default=None, help="for --dry-run: h100, a100, ... or cpu (default: this machine)")
    p.add_argument("--assume-world-size", type=int, default=None, help="for --dry-run: devices (default: 8 for a GPU name, else this run's)")
    p.add_argument("--assume-mfu", type=float, default=0.40, help="for --dry-run: MFU to assume for the time estimate")
    return p.parse_args(argv)


def check_args(args):
    for name in ("depth", "head_dim", "aspect_ratio", "max_seq_len", "device_batch_size"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.total_batch_size <= 0 and args.total_batch_size != -1:
        raise SystemExit(f"error: --total-batch-size must be positive, or -1 (from the model size), got {args.total_batch_size}")
    if args.num_iterations == 0 or args.target_param_data_ratio <= 0:
        raise SystemExit("error: --num-iterations must be positive (or -1) and --target-param-data-ratio positive")
    if not 0 <= args.warmdown_ratio <= 1 or not 0 <= args.final_lr_frac <= 1 or args.warmup_steps < 0:
        raise SystemExit("error: --warmdown-ratio and --final-lr-frac must lie in [0, 1], --warmup-steps >= 0")
    if not 0 <= args.normuon_beta2 < 1:
        raise SystemExit("error: --normuon-beta2 must lie in [0, 1) (0: off)")


def estimate_memory(model, args, world_size, dtype):
    """Rough bytes per device: fp32 weights + grads, optimizer state (sharded), saved activations."""
    c = model.config
    n_params = model.num_params()
    weights = grads = 4 * n_params
    adam_params = n_params - sum(p.numel() for p in model.param_groups()["matrix"])
    optimizer = (8 * adam_params + 4 * (n_params - adam_params)) / world_size  # Adam m, v; Muon momentum
    act_bytes = 2 if dtype == torch.bfloat16 else 4
    tokens = args.device_batch_size * args.max_seq_len
    # per layer per token: ~27 tensors of width n_embd kept for backward (norms, q/k/v before and
    # after rotary and QK-norm, attention output, the 4x-wide MLP hidden three times, residuals)
    per_layer = 27 * c.n_embd * act_bytes
    logits = model.padded_vocab_size * (act_bytes + 4 + 4)  # head output, fp32 softcapped logits, their grad
    activations = tokens * (c.n_layer * per_layer + logits)
    return {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations}


def plan_shards(total_tokens, tokenizer):
    """'train shards needed: N (...)': from the token budget, the text per shard and characters per token,
    each measured on the first local train shard when there is one (and a tokenizer), else the remote's."""
    try:
        first = list_shards("train")[0]
    except FileNotFoundError:
        first = None
    per_shard = shard_chars(first) if first else REMOTE_SHARD_CHARS
    chars_per_token, how = 4.8, "assumed: no tokenizer or shard yet"
    if first and tokenizer is not None:
        sample = next(pq.ParquetFile(first).iter_batches(columns=["text"], batch_size=256)).column(0).to_pylist()
        tokens = sum(len(ids) for ids in tokenizer.encode(sample))
        chars_per_token, how = sum(map(len, sample)) / max(tokens, 1), "measured"
    n = shards_needed(total_tokens, chars_per_token, per_shard)
    return (f"train shards needed: {n} ({total_tokens:,} tokens x {chars_per_token:.2f} chars/token ({how}) "
            f"/ {per_shard:,} chars per shard, +10%)")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    ddp, rank, world_size, device, dtype, autocast = init_stage(args)
    master = rank == 0
    device_type = device.type
    checkpoint_dir = os.path.join(get_base_dir(), "base_checkpoints", args.model_tag or f"d{args.depth}")

    tokenizer = None
    try:
        tokenizer = get_tokenizer()
        token_bytes = get_token_bytes(device=device)
        vocab_size = tokenizer.get_vocab_size()
    except (FileNotFoundError, ValueError) as e:
        if not args.dry_run:
            raise SystemExit(f"error: {e}")
        vocab_size = 32768  # planning needs only the size
        print0(f"no tokenizer yet ({e}); planning with the default vocabulary of {vocab_size:,}")

    # ---------------------------------------------------------------------------------------------
    # the model: built on the meta device, materialised and initialised in one place
    architecture = architecture_fields(args)
    config = config_for_depth(args.depth, vocab_size, args.max_seq_len, head_dim=args.head_dim,
                              aspect_ratio=args.aspect_ratio, **architecture)
    with torch.device("meta"):
        model = GPT(config)  # sizes and FLOPs are known here, before any memory is spent
    n_params, n_scaling = model.num_params(), model.num_scaling_params()
    flops_per_token = model.estimate_flops()

    # ---------------------------------------------------------------------------------------------
    # horizon and batch arithmetic
    tokens_per_micro = args.device_batch_size * args.max_seq_len
    # a dry run plans for the devices it assumes (--assume-device h100: 8 of them, unless --assume-world-size)
    gpu_plan = args.dry_run and args.assume_device and args.assume_device.lower() != "cpu"
    plan_world = (args.assume_world_size or (8 if gpu_plan else world_size)) if args.dry_run else world_size
    world_tokens_per_micro = tokens_per_micro * plan_world
    lr_share, muon_weight_decay, reference = 1.0, args.muon_weight_decay, None
    if args.total_batch_size == -1:  # the batch rule: from this model's training tokens against depth 12's
        with torch.device("meta"):
            reference = GPT(config_for_depth(REFERENCE_DEPTH, vocab_size, args.max_seq_len, head_dim=args.head_dim,
                                             aspect_ratio=args.aspect_ratio, **architecture)).num_scaling_params()
        ratio = args.target_param_data_ratio
        args.total_batch_size = auto_batch_size(ratio * n_scaling, ratio * reference, world_tokens_per_micro)
        lr_share = batch_lr_scale(args.total_batch_size)
        print0(f"batch from the model size: {args.total_batch_size:,} tokens ({n_scaling / reference:.2f}x the depth-"
               f"{REFERENCE_DEPTH} scaling parameters); LRs x {lr_share:.3f} (sqrt of batch / 2^19)")
    if args.total_batch_size % world_tokens_per_micro != 0:
        raise SystemExit(f"error: --total-batch-size {args.total_batch_size} is not a multiple of device_batch_size "
                         f"* max_seq_len * world_size = {args.device_batch_size} * {args.max_seq_len} * {plan_world} "
                         f"= {world_tokens_per_micro}; pick e.g. {max(1, round(args.total_batch_size / world_tokens_per_micro)) * world_tokens_per_micro}")
    grad_accum = args.total_batch_size // world_tokens_per_micro
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = max(1, round(args.target_param_data_ratio * n_scaling / args.total_batch_size))
    total_tokens = num_iterations * args.total_batch_size
    if reference is not None and muon_weight_decay:
        muon_weight_decay *= batch_weight_decay_scale(args.total_batch_size, total_tokens,
                                                      args.target_param_data_ratio * reference)
        print0(f"Muon weight decay from the depth-{REFERENCE_DEPTH} value: {args.muon_weight_decay:g} -> "
               f"{muon_weight_decay:.4g} (constant B / (lr * decay * tokens))")
    schedule = base_schedule(args, num_iterations)
    scalars = "scalars" in model.param_groups()  # the architecture flags' lambdas and gates: an AdamW group of their own
    lrs = peak_lrs(config.n_embd, args.matrix_lr, args.embedding_lr, args.unembedding_lr, share=lr_share,
                   scalar_lr=args.scalar_lr if scalars else None)
    adam_betas = {"embedding": args.embedding_betas, "lm_head": args.unembedding_betas,
                  **({"scalars": args.scalar_betas} if scalars else {})}
    recipe = optimizer_recipe(lrs, args.orthogonalize, args.normuon_beta2 or None, adam_betas)  # the later stages inherit it
    print0("peak LRs: " + ", ".join(f"{name} {lr:.5g}" for name, lr in lrs.items())
           + f"; warmup {schedule.warmup_steps} steps, warmdown {schedule.warmdown_steps} steps to {args.final_lr_frac:g}")
    print0(f"model: depth {config.n_layer}, width {config.n_embd}, heads {config.n_head} (kv {config.n_kv_head}), "
           f"vocab {vocab_size:,} (padded {model.padded_vocab_size:,}), context {config.sequence_len}")
    print0(f"parameters: {n_params:,} ({n_scaling:,} block matrices + lm_head) | FLOPs per token: {flops_per_token:.3e}")
    print0(f"steps: {num_iterations:,} x {args.total_batch_size:,} tokens = {total_tokens:,} tokens "
           f"({total_tokens / n_scaling:.1f} tokens per scaling parameter); grad accumulation {grad_accum} x world size "
           f"{plan_world}")

    if device_type == "cuda" and gpu_peak_flops(torch.cuda.get_device_name(device)) and dtype == torch.bfloat16:
        peak_flops = gpu_peak_flops(torch.cuda.get_device_name(device))
        peak_source = torch.cuda.get_device_name(device) + " bf16 datasheet"
    else:
        peak_flops = measure_matmul_peak(device, dtype)
        peak_source = f"measured {str(dtype).removeprefix('torch.')} matmul on {device_type}"
    print0(f"peak per device: {peak_flops / 1e12:.2f} TFLOP/s ({peak_source})")

    if args.dry_run:
        memory = estimate_memory(model, args, plan_world, dtype)
        print0("estimated memory per device: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in memory.items())
               + f" | total {sum(memory.values()) / 2**30:.2f} GiB (activations as saved by eager mode: "
               f"an upper bound, torch.compile keeps fewer; lower --device-batch-size if it does not fit)")
        assumed = args.assume_device
        if gpu_plan:
            assumed_peak = gpu_peak_flops(assumed)
            if assumed_peak is None:
                raise SystemExit(f"error: unknown --assume-device {assumed!r}; known: cpu, {', '.join(sorted(GPU_BF16_PEAK))}")
        else:
            assumed, assumed_peak = (assumed or device_type), peak_flops
        seconds = flops_per_token * total_tokens / (assumed_peak * plan_world * args.assume_mfu)
        print0(f"estimated wall time on {plan_world} x {assumed} at {args.assume_mfu:.0%} MFU: "
               f"{seconds / 3600:.2f} h ({flops_per_token * total_tokens:.3e} FLOPs)")
        print0(plan_shards(total_tokens, tokenizer))
        print0("dry run: nothing trained, nothing written")
        compute_cleanup()
        return

    model.to_empty(device=device)
    torch.manual_seed(args.seed)
    model.init_weights()
    if maybe_enable_fp8(model, args.fp8, device):  # before the optimizers and compile; refuses where fp8 cannot run
        print0("fp8: the block linears multiply in float8 (tensorwise scales); lm_head and embedding unchanged")

    # ---------------------------------------------------------------------------------------------
    # optimizers, data, and the state a resume restores
    optimizers = model.setup_optimizers(lrs, weight_decay={"embedding": args.embedding_weight_decay,
                                                           "lm_head": args.unembedding_weight_decay},
                                        adam_betas=adam_betas, muon_weight_decay=muon_weight_decay,
                                        ns_dtype=dtype,  # bf16 runs orthogonalise in bf16 too
                                        orthogonalize=args.orthogonalize, beta2=args.normuon_beta2 or None,
                                        cautious=args.cautious)
    state, reader_states = BaseState(), [None] * grad_accum
    if args.resume:
        state, dl_state = resume_run(BaseState, checkpoint_dir, model, optimizers, args, RESUME_FLAGS, device, rank)
        if dl_state is None or len(dl_state["readers"]) != grad_accum:
            raise SystemExit("error: the checkpoint's data position does not match this run's gradient "
                             "accumulation; resume with the same batch flags")
        reader_states = dl_state["readers"]
    elif ddp:
        for p in model.parameters():  # identical initial weights on every rank, whatever the RNG did
            dist.broadcast(p.data, src=0)

    readers = [DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "train", device,
                          rank=rank * grad_accum + k, world_size=world_size * grad_accum,
                          resume_state=reader_states[k]) for k in range(grad_accum)]
    reader_iters = [iter(r) for r in readers]

    orig_model = model  # eval and sampling use the uncompiled module (new shapes would recompile)
    if args.compile:
        model = torch.compile(model, dynamic=False)
    log = StageLog(checkpoint_dir, args, "nanochat", master)

    def evaluate(step):
        # at most one pass of the val split (loop=False): a small split is not counted twice
        eval_steps = max(1, args.eval_tokens // world_tokens_per_micro)
        val_loader = DataLoader(tokenizer, args.device_batch_size, args.max_seq_len, "val", device,
                                rank=rank, world_size=world_size, loop=False)
        orig_model.eval()
        bpb, tokens = evaluate_bpb(orig_model, val_loader, eval_steps, token_bytes, autocast=autocast)
        orig_model.train()
        state.val_bpb = bpb
        state.min_val_bpb = bpb if state.min_val_bpb is None else min(state.min_val_bpb, bpb)
        log.eval(step, f"val bpb {bpb:.4f} over {tokens:,} tokens", {"val_bpb": bpb, "val_tokens": tokens},
                 {"val/bpb": bpb})

    def sample():
        orig_model.eval()
        for prompt in SAMPLE_PROMPTS:
            ids = tokenizer.encode(prompt, prepend="<|bos|>")
            with autocast:
                out = list(orig_model.generate(ids, max_tokens=16, temperature=0))
            print0(f"sample: {prompt!r} -> {tokenizer.decode(out)!r}")
        orig_model.train()

    # ---------------------------------------------------------------------------------------------
    # the loop: step s trains on the s-th batch; a checkpoint at step s holds the state before it
    position_weights = torch.arange(1, args.max_seq_len + 1, device=device)  # for --log-data-checksum
    stop = StopRequest(device)
    while True:
        step = state.step
        last, stopping = step == num_iterations, stop.requested(step, args.stop_after_step)
        if state.save_due(last, stopping, args.save_every):  # before any eval, so a crash during it loses nothing
            save_stage(checkpoint_dir, state, orig_model, optimizers, args,
                       {"val_bpb": state.val_bpb, "num_iterations": num_iterations, "recipe": recipe},
                       dataloader_state={"readers": [r.state for r in readers]})
        if stopping and not last:
            break
        if last or due(args.eval_every, step):
            evaluate(step)
        if master and (last or (due(args.sample_every, step) and step > 0)):
            sample()
        if last:
            break

        # one optimizer step over grad_accum micro-batches
        t0 = time.time()
        lrm = schedule.apply(optimizers, step)
        micro_batches = [next(reader_iters[k])[:2] for k in range(grad_accum)]
        checksum = None
        if args.log_data_checksum:  # which tokens this step saw; a debug aid, off the production path
            checksum = sum((x * position_weights).sum() for x, _ in micro_batches)
            if ddp:
                dist.all_reduce(checksum, op=dist.ReduceOp.SUM)
        # the loss is the mean over every token of the step, all ranks (logged after the step, a sync point)
        loss_value, _ = train_step(model, optimizers, micro_batches, autocast, world_size)
        dt = time.time() - t0
        smooth = state.end_step(loss_value, dt)
        if state.step % args.log_every == 0 or state.step == num_iterations:
            tokens_per_s = args.total_batch_size / dt  # the whole step: all ranks, all micro-batches
            mfu = flops_per_token * tokens_per_s / (peak_flops * world_size)
            cropped = sum(r.cropped_fraction() for r in readers) / len(readers)
            record = {"loss": loss_value, "smooth_loss": smooth, "lrm": lrm, "dt": dt, "tokens_per_s": tokens_per_s,
                      "mfu": mfu, "cropped_fraction": cropped}
            if checksum is not None:
                record["data_checksum"] = checksum.item()
            log.step(state, num_iterations, f"loss {smooth:.4f} | lrm {lrm:.3f} | dt {dt * 1000:.0f} ms | "
                     f"tok/s {tokens_per_s:,.0f} | MFU {100 * mfu:.1f}%", record,
                     {"train/loss": smooth, "train/lrm": lrm, "train/tok_per_sec": tokens_per_s, "train/mfu": mfu})

    if state.step == num_iterations and master:
        get_report().log("Base model training", [vars(args), {
            "parameters": n_params, "FLOPs per token": f"{flops_per_token:.3e}", "steps": num_iterations,
            "tokens": total_tokens, "tokens per scaling parameter": total_tokens / n_scaling,
            "dtype": str(dtype).removeprefix("torch."), "world size": world_size,
            "final val bpb": state.val_bpb, "min val bpb": state.min_val_bpb,
            "training time (min)": state.train_time / 60,
            "peak memory (MiB)": peak_memory_mib(device),
        }])
    stop.finish(state, num_iterations, log)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
