"""
Midtraining: continue pretraining the base model on conversations, so it learns the chat format,
the special tokens, multiple choice and calculator tool use.

    python -m scripts.mid_train                        # the largest base model -> mid_checkpoints/<same tag>
    torchrun --standalone --nproc_per_node=8 -m scripts.mid_train

Every conversation of the mixture is rendered with render_conversation (BOS first) and the whole
mixture is packed best-fit into rows of max_seq_len + 1 tokens once, deterministically; step s uses
rows [s * rows_per_step, (s + 1) * rows_per_step), so a resume needs only the step. The loss is on
every token (this is still pretraining, on chat-shaped text). The LR is flat, then decays linearly to
0 over the last --warmdown-ratio of the steps.
Saving, --resume, and SIGTERM / Ctrl-C (save, then exit 128 + signal): nanochat/stage.py.
"""

import argparse
import os
import time
from dataclasses import dataclass

import torch

from nanochat.checkpoint import add_checkpoint_args
from nanochat.common import FetchError, print0
from nanochat.dataloader import pack_conversations
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import get_report
from nanochat.schedule import Schedule
from nanochat.stage import (LoopState, StageLog, StopRequest, add_stage_args, due, init_stage, load_stage_model,
                            parse_stage_args, resume_run, save_stage, stage_optimizers)
from nanochat.tokenizer import get_token_bytes
from nanochat.training import train_step
from tasks.catalog import IDENTITY_FILE
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


@dataclass
class MidState(LoopState):
    val_bpb: float | None = None


# a --resume must keep these flags: they decide which data each step sees
RESUME_FLAGS = ("total_batch_size", "max_seq_len", "seed", "device_batch_size")


def build_mixture(split):
    """(name, task) pairs of the midtraining mixture; offline the general chat share is SGD + Self-Instruct."""
    if split == "train":
        parts = [("general chat", SmolTalk("train")), ("MMLU auxiliary", MMLU("auxiliary_train", "train")),
                 ("GSM8K", GSM8K("main", "train")), ("SpellingBee", SpellingBee(2000, "train")),
                 ("SimpleSpelling", SimpleSpelling(1000, "train"))]
        if os.path.exists(IDENTITY_FILE):
            parts.append(("identity", CustomJSON(IDENTITY_FILE)))
    else:
        parts = [("general chat", SmolTalk("test")), ("MMLU", MMLU("all", "validation")[:300]),
                 ("GSM8K", GSM8K("main", "test")[:300]), ("SpellingBee", SpellingBee(200, "test"))]
    return parts


def pack_mixture(parts, tokenizer, row_len, seed):
    """All conversations rendered and packed into rows: tokens (N, row_len) long, their loss masks, counts."""
    mixture = TaskMixture([task for _, task in parts], seed=seed)
    docs, masks, too_long = [], [], 0
    for i in range(len(mixture)):
        ids, mask = tokenizer.render_conversation(mixture[i], max_tokens=None)
        if len(ids) > row_len:
            too_long += 1  # cropped by the packer, counted here so the log says how many
        docs.append(ids)
        masks.append(mask)
    rows, row_masks, cropped = pack_conversations(docs, masks, row_len)
    counts = {"conversations": len(docs), "too long": too_long, "cropped tokens": cropped}
    return torch.tensor(rows, dtype=torch.long), torch.tensor(row_masks, dtype=torch.bool), counts


def main(argv=None):
    p = argparse.ArgumentParser(description="Midtrain a base model on conversations.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="base")
    add_stage_args(p, "mid", init_lr_frac=1.0, seed=7)
    p.add_argument("--max-seq-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per micro-batch per device")
    p.add_argument("--total-batch-size", type=int, default=524288, help="tokens per optimizer step, all ranks")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: one pass over the mixture)")
    p.add_argument("--warmdown-ratio", type=float, default=0.2, help="share of steps of linear decay to 0")
    p.add_argument("--eval-every", type=int, default=150, help="val bpb every N steps (-1: end only)")
    p.add_argument("--eval-tokens", type=int, default=20 * 524288,
                   help="val tokens per evaluation, at most (never more than one pass of the val rows)")
    p.add_argument("--loss-on", choices=["all", "assistant"], default="all",
                   help="all: every token (midtraining is still pretraining, on chat-shaped text); "
                        "assistant: only the tokens the conversation mask marks")
    args = parse_stage_args(p, argv)

    ddp, rank, world_size, device, dtype, autocast = init_stage(args)
    master = rank == 0
    model, tokenizer, meta, checkpoint_dir = load_stage_model(args, "mid", device)
    T = args.max_seq_len or model.config.sequence_len

    t0 = time.time()
    try:
        train_parts, val_parts = build_mixture("train"), build_mixture("val")
    except FetchError as e:  # offline without NANOCHAT_LOCAL_DATA: one line, not a traceback
        raise SystemExit(f"error: {e}")
    for name, task in train_parts:
        print0(f"mixture: {name:<16} {len(task):>7,} conversations")
    train_rows, train_masks, train_counts = pack_mixture(train_parts, tokenizer, T + 1, args.seed)
    val_rows, val_masks, val_counts = pack_mixture(val_parts, tokenizer, T + 1, args.seed + 1)
    print0(f"packed {train_counts['conversations']:,} conversations into {len(train_rows):,} rows of {T + 1} tokens "
           f"({train_counts['too long']} longer than a row were cropped; {train_counts['cropped tokens']:,} tokens dropped) "
           f"in {time.time() - t0:.1f}s; val {len(val_rows):,} rows")

    tokens_per_micro = args.device_batch_size * T
    if args.total_batch_size % (tokens_per_micro * world_size):
        raise SystemExit(f"error: --total-batch-size {args.total_batch_size} is not a multiple of device_batch_size * "
                         f"max_seq_len * world_size = {tokens_per_micro * world_size}")
    grad_accum = args.total_batch_size // (tokens_per_micro * world_size)
    rows_per_step = args.total_batch_size // T
    one_pass = len(train_rows) // rows_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else one_pass
    if num_iterations < 1:
        raise SystemExit(f"error: the mixture packs into {len(train_rows)} rows, fewer than one step "
                         f"({rows_per_step} rows); lower --total-batch-size")
    print0(f"steps: {num_iterations} x {args.total_batch_size:,} tokens ({num_iterations / max(one_pass, 1):.2f} passes); "
           f"grad accumulation {grad_accum} x world size {world_size}")
    token_bytes = get_token_bytes(device=device)

    optimizers, recipe = stage_optimizers(model, args, dtype, meta)
    schedule = Schedule(num_iterations, warmdown_ratio=args.warmdown_ratio)  # Muon's momentum ramps up again
    state = MidState()
    if args.resume:
        state, _ = resume_run(MidState, checkpoint_dir, model, optimizers, args, RESUME_FLAGS, device, rank)
    log = StageLog(checkpoint_dir, args, "nanochat-mid", master)

    def split_row(rows, masks):
        x, y = rows[:, :-1].clone(), rows[:, 1:].clone()
        if args.loss_on == "assistant":
            y[~masks[:, 1:]] = -1
        return x.to(device), y.to(device)

    def batch_rows(step, k):
        """Rows of micro-step k on this rank at `step` (cycling over the packed mixture)."""
        first = step * rows_per_step + (rank * grad_accum + k) * args.device_batch_size
        idx = torch.arange(first, first + args.device_batch_size) % len(train_rows)
        return split_row(train_rows[idx], train_masks[idx])

    def val_batches():
        """One pass of the packed val rows, dealt out to the ranks in turn (the last batches may be short)."""
        for i in range(rank * args.device_batch_size, len(val_rows), world_size * args.device_batch_size):
            yield split_row(val_rows[i:i + args.device_batch_size], val_masks[i:i + args.device_batch_size])

    # step s trains on the s-th batch; a checkpoint at step s holds the state before it
    stop = StopRequest(device)
    while True:
        step = state.step
        last, stopping = step == num_iterations, stop.requested(step, args.stop_after_step)
        if state.save_due(last, stopping, args.save_every):  # before the eval: a crash in it loses nothing
            save_stage(checkpoint_dir, state, model, optimizers, args,
                       {"val_bpb": state.val_bpb, "source": args.source, "source_step": meta["step"], "recipe": recipe})
        if stopping and not last:
            break
        if last or due(args.eval_every, step):
            model.eval()
            eval_steps = max(1, args.eval_tokens // (tokens_per_micro * world_size))
            state.val_bpb, val_tokens = evaluate_bpb(model, val_batches(), eval_steps, token_bytes, autocast=autocast)
            model.train()
            log.eval(step, f"val bpb {state.val_bpb:.4f} over {val_tokens:,} tokens",
                     {"val_bpb": state.val_bpb, "val_tokens": val_tokens}, {"val/bpb": state.val_bpb})
        if last:
            break
        t0 = time.time()
        lrm = schedule.apply(optimizers, step)
        micro_batches = [batch_rows(step, k) for k in range(grad_accum)]
        loss_value, _ = train_step(model, optimizers, micro_batches, autocast, world_size)
        dt = time.time() - t0
        smooth = state.end_step(loss_value, dt)
        tokens_per_s = args.total_batch_size / dt
        log.step(state, num_iterations, f"loss {smooth:.4f} | lrm {lrm:.3f} | tok/s {tokens_per_s:,.0f}",
                 {"loss": loss_value, "smooth_loss": smooth, "lrm": lrm, "tokens_per_s": tokens_per_s},
                 {"train/loss": smooth, "train/lrm": lrm})

    if state.step == num_iterations and master:
        get_report().log("Midtraining", [vars(args), {
            "source step": meta["step"], "conversations": train_counts["conversations"], "rows": len(train_rows),
            "conversations longer than a row": train_counts["too long"], "steps": num_iterations,
            "final val bpb": state.val_bpb, "training time (min)": state.train_time / 60},
            "mixture: " + ", ".join(f"{name} {len(task):,}" for name, task in train_parts)])
    stop.finish(state, num_iterations, log)


if __name__ == "__main__":
    main()
