"""
Supervised fine-tuning: the midtrained model learns to answer, on whole conversations.

    python -m scripts.chat_sft                          # the largest mid model -> chatsft_checkpoints/<same tag>
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft

The mixture is rendered (BOS first) and shuffled once (seeded), then packed best-fit into rows of
max_seq_len + 1 tokens, whole conversations only (nanochat.dataloader.pack_sft_rows): none is ever cut,
a conversation longer than a row is dropped and counted, and so is one with nothing to train; the end
of a row is padding. The loss is taken only where render_conversation's mask is 1 (the assistant's
text, its tool calls and <|assistant_end|>); user turns, tool outputs, each conversation's BOS and
padding contribute nothing. The step's loss is the mean over every trained token of all its rows on
all ranks (nanochat.training.train_step), so a long answer weighs by its tokens. Step s takes rows
[s * rows_per_step, (s + 1) * rows_per_step) (cycling), so a resume needs only the step. The LRs,
betas and sequence length are the input checkpoint's (nanochat.stage.stage_optimizers; the flags
override them), the LR decays linearly to 0 over the run, and --load-optimizer starts from the input
checkpoint's optimizer state (its moments; the LRs stay SFT's). Every --eval-every steps: the masked
val loss (val rows packed the same way, one pass at most); every --eval-metrics-every steps: a quick
ARC-Easy accuracy and GSM8K accuracy + answer format share.
Checkpoints, exact --resume and the save-then-exit on SIGTERM / Ctrl-C are nanochat/stage.py's.
"""

import argparse
import os
import time
from dataclasses import dataclass, field

from nanochat.checkpoint import add_checkpoint_args
from nanochat.common import FetchError, print0
from nanochat.dataloader import conversation_batch, pack_sft_rows
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_loss
from nanochat.report import get_report
from nanochat.schedule import Momentum, Schedule
from nanochat.stage import (LoopState, StageLog, StopRequest, add_stage_args, due, init_stage, load_stage_model,
                            load_optimizer_moments, parse_stage_args, resume_run, save_stage, stage_optimizers)
from nanochat.task_eval import evaluate_task
from nanochat.training import train_step
from tasks.arc import ARC
from tasks.catalog import IDENTITY_FILE
from tasks.common import TaskMixture
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import SimpleSpelling, SpellingBee


@dataclass
class SFTState(LoopState):
    val_loss: float | None = None
    metrics: dict = field(default_factory=dict)  # the last quick task accuracies


# a --resume must keep these flags: they decide which data each step sees
RESUME_FLAGS = ("rows_per_step", "max_seq_len", "seed", "num_iterations", "num_epochs", "load_optimizer")


def build_mixture(split):
    """(name, task) pairs of the SFT mixture; offline the general chat share is SGD + Self-Instruct."""
    if split == "train":
        parts = [("ARC-Easy", ARC("ARC-Easy", "train")), ("ARC-Challenge", ARC("ARC-Challenge", "train")),
                 ("GSM8K", GSM8K("main", "train")), ("general chat", SmolTalk("train")[:10_000]),
                 ("SimpleSpelling", SimpleSpelling(300, "train")), ("SpellingBee", SpellingBee(300, "train"))]
        if os.path.exists(IDENTITY_FILE):
            # a small set: seen twice, so that "who are you" is answered in the model's own words
            parts.append(("identity", CustomJSON(IDENTITY_FILE)))
            parts.append(("identity (2nd copy)", CustomJSON(IDENTITY_FILE)))
    else:
        parts = [("general chat", SmolTalk("test")), ("GSM8K", GSM8K("main", "test")[:200]),
                 ("ARC-Easy", ARC("ARC-Easy", "validation"))]
    return parts


def render_all(parts, tokenizer, seed):
    """The whole mixture rendered (ids, mask) in its shuffled order: rendering is cheap next to training."""
    mixture = TaskMixture([task for _, task in parts], seed=seed)
    return [tokenizer.render_conversation(mixture[i], max_tokens=None) for i in range(len(mixture))]


def packing_stats(rows, dropped, row_len):
    """What packing made of the mixture, for the log, the checkpoint's meta and the report."""
    tokens = sum(len(ids) for row in rows for ids, _ in row)
    return {"conversations packed": sum(map(len, rows)), "rows": len(rows), "row tokens": row_len,
            "fill": round(tokens / max(len(rows) * row_len, 1), 4),
            "trained tokens": sum(sum(mask[1:]) for row in rows for _, mask in row),
            "dropped too long": dropped["too_long"], "dropped nothing to train": dropped["nothing_to_train"]}


def main(argv=None):
    p = argparse.ArgumentParser(description="Supervised fine-tuning of a midtrained model on conversations.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="mid")
    add_stage_args(p, "SFT", init_lr_frac=0.02, seed=11)
    p.add_argument("--max-seq-len", type=int, default=None, help="longest row; default: the model's context length")
    p.add_argument("--device-batch-size", type=int, default=4, help="packed rows per micro-batch per device")
    p.add_argument("--rows-per-step", type=int, default=8, help="packed rows per optimizer step, all ranks")
    p.add_argument("--load-optimizer", action="store_true",
                   help="start from the input checkpoint's optimizer state (moments only; the LRs are SFT's)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over the mixture (when --num-iterations is -1)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: --num-epochs passes)")
    p.add_argument("--eval-every", type=int, default=100, help="val loss every N steps (-1: end only)")
    p.add_argument("--eval-steps", type=int, default=50,
                   help="val micro-batches per evaluation, all ranks (one pass at most)")
    p.add_argument("--eval-metrics-every", type=int, default=200, help="quick task accuracy every N steps (-1: end only)")
    p.add_argument("--eval-problems", type=int, default=100, help="problems per task in the quick accuracy (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest GSM8K answer in the quick accuracy")
    args = parse_stage_args(p, argv)

    ddp, rank, world_size, device, dtype, autocast = init_stage(args)
    master = rank == 0
    model, tokenizer, meta, checkpoint_dir = load_stage_model(args, "sft", device)
    engine, pad_id = Engine(model, tokenizer), tokenizer.get_bos_token_id()
    T = args.max_seq_len or model.config.sequence_len

    per_step = args.device_batch_size * world_size
    if args.rows_per_step % per_step:
        raise SystemExit(f"error: --rows-per-step {args.rows_per_step} is not a multiple of "
                         f"device_batch_size * world_size = {per_step}")
    grad_accum = args.rows_per_step // per_step
    optimizers, recipe = stage_optimizers(model, args, dtype, meta)
    state = SFTState()
    if args.resume:  # the run's own optimizer state, warm-started or not
        state, _ = resume_run(SFTState, checkpoint_dir, model, optimizers, args, RESUME_FLAGS, device, rank)
    elif args.load_optimizer:
        load_optimizer_moments(optimizers, args, meta, device, rank, world_size)

    t0 = time.time()
    try:
        train_parts, val_parts = build_mixture("train"), build_mixture("val")
    except FetchError as e:  # offline without NANOCHAT_LOCAL_DATA: one line, not a traceback
        raise SystemExit(f"error: {e}")
    for name, task in train_parts:
        print0(f"mixture: {name:<20} {len(task):>7,} conversations")
    train_data = render_all(train_parts, tokenizer, args.seed)
    val_data = render_all(val_parts, tokenizer, args.seed + 1)
    train_rows, dropped = pack_sft_rows(train_data, T + 1)
    val_rows, _ = pack_sft_rows(val_data, T + 1)
    packing = packing_stats(train_rows, dropped, T + 1)
    print0(f"rendered {len(train_data):,} train and {len(val_data):,} val conversations in {time.time() - t0:.1f}s; "
           f"packed {packing['conversations packed']:,} into {packing['rows']:,} rows of {T + 1} tokens (fill "
           f"{100 * packing['fill']:.1f}%, {packing['trained tokens']:,} trained tokens), dropped "
           f"{dropped['too_long']:,} longer than a row and {dropped['nothing_to_train']:,} with nothing to train; "
           f"val {len(val_rows):,} rows")
    if not train_rows or not val_rows:
        raise SystemExit(f"error: no train or val conversation fits in a row of {T + 1} tokens; raise --max-seq-len")
    one_epoch = len(train_rows) // args.rows_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else one_epoch * args.num_epochs
    if num_iterations < 1:
        raise SystemExit(f"error: {len(train_rows)} packed rows make less than one step of "
                         f"{args.rows_per_step}; lower --rows-per-step")
    print0(f"steps: {num_iterations} x {args.rows_per_step} rows "
           f"({num_iterations / max(one_epoch, 1):.2f} epochs); grad accumulation {grad_accum} x world size {world_size}")

    # linear decay to 0 over the whole run; Muon's momentum stays where the optimizer starts it
    schedule = Schedule(num_iterations, warmdown_ratio=1.0, momentum=Momentum.constant(0.95))
    log = StageLog(checkpoint_dir, args, "nanochat-sft", master)

    def micro_batch(step, k):
        """Micro-step k of `step` on this rank: its rows of the step, cycling over the packed rows."""
        first = step * args.rows_per_step + (k * world_size + rank) * args.device_batch_size
        rows = [train_rows[(first + j) % len(train_rows)] for j in range(args.device_batch_size)]
        return conversation_batch(rows, T + 1, pad_id, device)

    def val_batches():
        """This rank's share of the first eval_steps val micro-batches, each val row once at most."""
        passes = min(args.eval_steps, -(-len(val_rows) // args.device_batch_size))
        for b in range(rank, passes, world_size):
            rows = val_rows[b * args.device_batch_size:(b + 1) * args.device_batch_size]
            yield conversation_batch(rows, T + 1, pad_id, device)

    def val_loss():
        """Mean masked loss per trained token over the val micro-batches of every rank."""
        model.eval()
        loss, _ = evaluate_loss(model, val_batches(), autocast)
        model.train()
        return loss

    def quick_metrics():
        model.eval()
        out = {}
        arc = evaluate_task(ARC("ARC-Easy", "test"), model, engine, tokenizer, autocast, args.eval_problems)
        out["ARC-Easy"] = arc["accuracy"]
        gsm = evaluate_task(GSM8K("main", "test"), model, engine, tokenizer, autocast, args.eval_problems,
                            max_new_tokens=args.max_new_tokens, progress_every=0)
        out["GSM8K"], out["GSM8K well-formed"] = gsm["accuracy"], gsm["well-formed"]
        model.train()
        return out

    stop = StopRequest(device)
    while True:
        step = state.step
        last, stopping = step == num_iterations, stop.requested(step, args.stop_after_step)
        if state.save_due(last, stopping, args.save_every):  # before the evals: a crash in them loses nothing
            save_stage(checkpoint_dir, state, model, optimizers, args,
                       {"val_loss": state.val_loss, "source": args.source, "source_step": meta["step"],
                        "recipe": recipe, "optimizer_warm_start": args.load_optimizer, "packing": packing})
        if stopping and not last:
            break
        if last or due(args.eval_every, step):
            state.val_loss = val_loss()
            log.eval(step, f"val loss {state.val_loss:.4f}", {"val_loss": state.val_loss}, {"val/loss": state.val_loss})
        if args.eval_problems > 0 and (last or (due(args.eval_metrics_every, step) and step > 0)):
            state.metrics = quick_metrics()
            log.eval(step, " | ".join(f"{k} {100 * v:.1f}%" for k, v in state.metrics.items()), state.metrics,
                     {f"eval/{k}": v for k, v in state.metrics.items()})
        if last:
            break
        t0 = time.time()
        lrm = schedule.apply(optimizers, step)
        micro_batches = [micro_batch(step, k) for k in range(grad_accum)]
        loss_value, tokens = train_step(model, optimizers, micro_batches, autocast, world_size)
        dt = time.time() - t0
        smooth = state.end_step(loss_value, dt)
        log.step(state, num_iterations, f"loss {smooth:.4f} | lrm {lrm:.3f} | trained tokens {tokens:,} | "
                 f"trained tok/s {tokens / dt:,.0f}",
                 {"loss": loss_value, "smooth_loss": smooth, "lrm": lrm, "tokens": tokens, "tokens_per_s": tokens / dt},
                 {"train/loss": smooth, "train/lrm": lrm})

    if state.step == num_iterations and master:
        get_report().log("Chat SFT", [vars(args), {
            "source step": meta["step"], "conversations": len(train_data), "steps": num_iterations,
            **{f"packing: {k}": v for k, v in packing.items()}, "final val loss": state.val_loss,
            **{f"{k} (quick, {args.eval_problems} problems)": v for k, v in state.metrics.items()},
            "training time (min)": state.train_time / 60},
            "mixture: " + ", ".join(f"{name} {len(task):,}" for name, task in train_parts)])
    stop.finish(state, num_iterations, log)


if __name__ == "__main__":
    main()
