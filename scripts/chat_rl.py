"""
Reinforcement learning on GSM8K: the SFT model samples answers, correct ones are reinforced.

    python -m scripts.chat_rl                           # the largest SFT model -> chatrl_checkpoints/<same tag>
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl

Each step takes --prompts-per-step GSM8K train problems (split over the ranks, in a seeded shuffled
order; step s takes problems [s * P, (s + 1) * P), so a resume needs only the step). For each, the
engine samples --num-samples completions with the calculator tool on; reward 1 for the right final
'#### answer', else 0; advantage = reward - the group's mean. The policy-gradient loss covers the
sampled tokens only and is normalised by their number over the whole step (see nanochat/rl.py for
the parts of GRPO left out, and why). The LR decays linearly to 0. Every --eval-every steps: pass@1
and pass@k on GSM8K test (k = --eval-samples at temperature --temperature).
"""

import argparse
import math
import random
import time

import torch
import torch.distributed as dist

from nanochat.checkpoint import add_checkpoint_args, save_checkpoint
from nanochat.common import DummyWandb, autocast_ctx, compute_cleanup, compute_init, parse_dtype, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.rl import group_advantages, pg_micro_batches, rollout
from nanochat.task_eval import evaluate_task
from nanochat.training import (MetricsLog, add_stage_args, apply_schedule, eta_seconds, load_stage_model,
                               parse_stage_args, resume_run, stage_optimizers, train_step)


def main(argv=None):
    p = argparse.ArgumentParser(description="RL on GSM8K with group-relative advantages.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="sft")
    add_stage_args(p, "RL", init_lr_frac=0.05, seed=13, save_every=60)
    p.add_argument("--prompts-per-step", type=int, default=16, help="GSM8K problems per step, all ranks")
    p.add_argument("--num-samples", type=int, default=16, help="completions sampled per problem (the group)")
    p.add_argument("--device-batch-size", type=int, default=8, help="rows per training forward pass")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest sampled answer")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="sampling top-k (0 = all)")
    p.add_argument("--num-epochs", type=int, default=1, help="passes over GSM8K train (when --num-iterations is -1)")
    p.add_argument("--num-iterations", type=int, default=-1, help="steps (-1: --num-epochs passes)")
    p.add_argument("--eval-every", type=int, default=60, help="pass@k on GSM8K test every N steps (-1: end only)")
    p.add_argument("--eval-problems", type=int, default=400, help="GSM8K test problems per evaluation (0: none)")
    p.add_argument("--eval-samples", type=int, default=4, help="k of pass@k in the evaluation")
    args = parse_stage_args(p, argv)
    if args.num_samples < 2:
        p.error("--num-samples must be >= 2: a group of one has no relative advantage")

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    master = rank == 0
    if args.prompts_per_step % world_size:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} is not a multiple of the world size "
                         f"{world_size}")
    dtype = parse_dtype(args.dtype, device.type)
    autocast = autocast_ctx(device.type, dtype)
    model, tokenizer, meta, checkpoint_dir = load_stage_model(args, "rl", device)
    print0(f"flags: {vars(args)}")

    from tasks.gsm8k import GSM8K
    train_task, test_task = GSM8K("main", "train"), GSM8K("main", "test")
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)
    one_epoch = len(order) // args.prompts_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else one_epoch * args.num_epochs
    per_rank = args.prompts_per_step // world_size
    print0(f"GSM8K train: {len(train_task):,} problems; {num_iterations} steps x {args.prompts_per_step} problems x "
           f"{args.num_samples} samples ({num_iterations / max(one_epoch, 1):.2f} epochs)")

    optimizers = stage_optimizers(model, args, dtype)
    loop = {"step": 0, "train_time": 0.0, "gen_time": 0.0, "first_reward": None, "mean_reward": None, "eval": {}}
    if args.resume:
        same_flags = ("prompts_per_step", "num_samples", "seed", "num_iterations", "num_epochs")
        loop = resume_run(checkpoint_dir, model, optimizers, args, same_flags, device, rank)
        print0(f"resumed from {checkpoint_dir} step {loop['step']}")
    engine = Engine(model, tokenizer)
    append_metrics = MetricsLog(checkpoint_dir, master).append
    wandb_run = DummyWandb()
    if args.run and master:
        import wandb
        wandb_run = wandb.init(project="nanochat-rl", name=args.run, config=vars(args))
    pad_id = tokenizer.get_bos_token_id()

    def evaluate(step):
        model.eval()
        result = evaluate_task(test_task, model, engine, tokenizer, autocast, args.eval_problems,
                               num_samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, progress_every=0)
        model.train()
        loop["eval"] = {k: v for k, v in result.items() if k.startswith("pass@") or k == "well-formed"}
        print0(f"step {step:05d} | GSM8K test ({args.eval_problems} problems) | " +
               " | ".join(f"{k} {100 * v:.1f}%" for k, v in loop["eval"].items()))
        append_metrics({"step": step, **loop["eval"]})
        wandb_run.log({"step": step, **{f"eval/{k}": v for k, v in loop["eval"].items()}})

    def save(step):
        save_checkpoint(checkpoint_dir, step, model, optimizers,
                        {"model_config": vars(model.config), "flags": vars(args), "loop": dict(loop, step=step),
                         "source": args.source, "source_step": meta["step"]})
        print0(f"saved checkpoint {checkpoint_dir} step {step}")

    def due(every, step):
        return every > 0 and step % every == 0

    step = start_step = loop["step"]
    while True:
        last = step == num_iterations
        stopping = step == args.stop_after_step
        if step != start_step and (last or stopping or due(args.save_every, step)):
            save(step)
        if stopping and not last:
            print0(f"stopped at step {step} (resume with --resume)")
            break
        if args.eval_problems > 0 and (last or due(args.eval_every, step)):
            evaluate(step)
        if last:
            break

        # rollouts: this rank's problems of the step, k samples each
        t0 = time.time()
        model.eval()
        sequences, masks, advantages = [], [], []
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # reward sum, samples, sampled tokens
        for j in range(per_rank):
            n = step * args.prompts_per_step + rank * per_rank + j
            conversation = train_task[order[n % len(order)]]
            prompt = tokenizer.render_for_completion(conversation)
            with autocast:
                seqs, ms, completions = rollout(engine, prompt, args.num_samples, args.max_new_tokens,
                                                args.temperature, args.top_k, seed=args.seed * 1_000_003 + n * 1009)
            rewards = [float(train_task.evaluate(conversation, c)) for c in completions]
            sequences += seqs
            masks += ms
            advantages += group_advantages(rewards).tolist()
            stats += torch.tensor([sum(rewards), len(rewards), sum(map(sum, ms))], dtype=torch.float64, device=device)
        model.train()
        t1 = time.time()
        # the policy-gradient step over the rows that carry signal
        lrm = 1.0 - step / num_iterations
        apply_schedule(optimizers, lrm)
        micro_batches = pg_micro_batches(sequences, masks, advantages, pad_id, args.device_batch_size, device)
        loss_value, tokens = train_step(model, optimizers, micro_batches, autocast, world_size)
        if not math.isfinite(loss_value):
            raise SystemExit(f"error: loss is {loss_value} at step {step}; lower the LRs")
        if ddp:
            dist.all_reduce(stats, op=dist.ReduceOp.SUM)
        t2 = time.time()
        reward_sum, samples, sampled_tokens = stats.tolist()
        mean_reward = reward_sum / samples
        step += 1
        loop["step"] = step
        loop["gen_time"] += t1 - t0
        loop["train_time"] += t2 - t0
        loop["mean_reward"] = mean_reward
        if loop["first_reward"] is None:
            loop["first_reward"] = mean_reward
        eta = eta_seconds(loop["train_time"], step - start_step, num_iterations - step)
        print0(f"step {step:05d}/{num_iterations:05d} | mean reward {mean_reward:.3f} | loss {loss_value:+.4f} | "
               f"trained tokens {tokens:,} of {int(sampled_tokens):,} sampled | lrm {lrm:.3f} | "
               f"generation {100 * (t1 - t0) / (t2 - t0):.0f}% of {t2 - t0:.1f}s | "
               f"completions/s {samples / (t1 - t0):.1f} | ETA {eta / 60:.1f} m")
        append_metrics({"step": step, "mean_reward": mean_reward, "loss": loss_value, "trained_tokens": tokens,
                        "sampled_tokens": sampled_tokens, "lrm": lrm, "gen_s": t1 - t0, "train_s": t2 - t1})
        wandb_run.log({"step": step, "train/reward": mean_reward, "train/loss": loss_value, "train/lrm": lrm})

    if step == num_iterations and master:
        get_report().log("Chat RL", [vars(args), {
            "source step": meta["step"], "steps": num_iterations, "first step mean reward": loop["first_reward"],
            "last step mean reward": loop["mean_reward"],
            **{f"GSM8K {k} ({args.eval_problems} problems)": v for k, v in loop["eval"].items()},
            "share of time generating": loop["gen_time"] / max(loop["train_time"], 1e-9),
            "training time (min)": loop["train_time"] / 60}])
    wandb_run.finish()
    compute_cleanup()


if __name__ == "__main__":
    main()
