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
Like every trainer, it saves and exits 143 on SIGTERM and resumes exactly (nanochat/stage.py).
"""

import argparse
import random
import time
from dataclasses import dataclass, field

from nanochat.checkpoint import add_checkpoint_args
from nanochat.common import FetchError, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.rl import group_advantages, pg_micro_batches, rollout
from nanochat.schedule import Momentum, Schedule
from nanochat.stage import (LoopState, StageLog, StopRequest, add_stage_args, due, init_stage, load_stage_model,
                            parse_stage_args, resume_run, save_stage, stage_optimizers)
from nanochat.task_eval import evaluate_task
from nanochat.training import all_sum, train_step
from tasks.gsm8k import GSM8K


@dataclass
class RLState(LoopState):
    gen_time: float = 0.0  # of train_time, the seconds spent sampling
    first_reward: float | None = None  # mean reward of the run's first step
    mean_reward: float | None = None  # ... and of the last one
    eval: dict = field(default_factory=dict)  # the last pass@k on GSM8K test


# a --resume must keep these flags: they decide which data each step sees
RESUME_FLAGS = ("prompts_per_step", "num_samples", "seed", "num_iterations", "num_epochs")


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

    ddp, rank, world_size, device, dtype, autocast = init_stage(args)
    master = rank == 0
    if args.prompts_per_step % world_size:
        raise SystemExit(f"error: --prompts-per-step {args.prompts_per_step} is not a multiple of the world size "
                         f"{world_size}")
    model, tokenizer, meta, checkpoint_dir = load_stage_model(args, "rl", device)
    engine, pad_id = Engine(model, tokenizer), tokenizer.get_bos_token_id()

    try:
        train_task, test_task = GSM8K("main", "train"), GSM8K("main", "test")
    except FetchError as e:  # offline without NANOCHAT_LOCAL_DATA: one line, not a traceback
        raise SystemExit(f"error: {e}")
    order = list(range(len(train_task)))
    random.Random(args.seed).shuffle(order)
    one_epoch = len(order) // args.prompts_per_step
    num_iterations = args.num_iterations if args.num_iterations > 0 else one_epoch * args.num_epochs
    per_rank = args.prompts_per_step // world_size
    print0(f"GSM8K train: {len(train_task):,} problems; {num_iterations} steps x {args.prompts_per_step} problems x "
           f"{args.num_samples} samples ({num_iterations / max(one_epoch, 1):.2f} epochs)")

    optimizers, recipe = stage_optimizers(model, args, dtype, meta)
    # linear decay to 0 over the whole run; Muon's momentum stays where the optimizer starts it
    schedule = Schedule(num_iterations, warmdown_ratio=1.0, momentum=Momentum.constant(0.95))
    state = RLState()
    if args.resume:
        state, _ = resume_run(RLState, checkpoint_dir, model, optimizers, args, RESUME_FLAGS, device, rank)
    log = StageLog(checkpoint_dir, args, "nanochat-rl", master)

    def evaluate(step):
        model.eval()
        result = evaluate_task(test_task, model, engine, tokenizer, autocast, args.eval_problems,
                               num_samples=args.eval_samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, progress_every=0)
        model.train()
        state.eval = {k: v for k, v in result.items() if k.startswith("pass@") or k == "well-formed"}
        log.eval(step, f"GSM8K test ({args.eval_problems} problems) | " +
                 " | ".join(f"{k} {100 * v:.1f}%" for k, v in state.eval.items()), state.eval,
                 {f"eval/{k}": v for k, v in state.eval.items()})

    stop = StopRequest(device)
    while True:
        step = state.step
        last, stopping = step == num_iterations, stop.requested(step, args.stop_after_step)
        if state.save_due(last, stopping, args.save_every):
            save_stage(checkpoint_dir, state, model, optimizers, args,
                       {"source": args.source, "source_step": meta["step"], "recipe": recipe})
        if stopping and not last:
            break
        if args.eval_problems > 0 and (last or due(args.eval_every, step)):
            evaluate(step)
        if last:
            break

        # rollouts: this rank's problems of the step, k samples each
        t0 = time.time()
        model.eval()
        sequences, masks, advantages = [], [], []
        reward_sum = samples = sampled_tokens = 0  # this rank's, summed over the ranks after the step
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
            reward_sum += sum(rewards)
            samples += len(rewards)
            sampled_tokens += sum(map(sum, ms))
        model.train()
        t1 = time.time()
        # the policy-gradient step over the rows that carry signal
        lrm = schedule.apply(optimizers, step)
        micro_batches = pg_micro_batches(sequences, masks, advantages, pad_id, args.device_batch_size, device)
        loss_value, tokens = train_step(model, optimizers, micro_batches, autocast, world_size)
        reward_sum, samples, sampled_tokens = all_sum([reward_sum, samples, sampled_tokens], device)  # float32
        t2 = time.time()
        state.end_step(loss_value, t2 - t0)
        if state.timed:
            state.gen_time += t1 - t0
        state.mean_reward = reward_sum / samples
        if state.first_reward is None:
            state.first_reward = state.mean_reward
        log.step(state, num_iterations, f"mean reward {state.mean_reward:.3f} | loss {loss_value:+.4f} | "
                 f"trained tokens {tokens:,} of {int(sampled_tokens):,} sampled | lrm {lrm:.3f} | "
                 f"generation {100 * (t1 - t0) / (t2 - t0):.0f}% of {t2 - t0:.1f}s | completions/s {samples / (t1 - t0):.1f}",
                 {"mean_reward": state.mean_reward, "loss": loss_value, "trained_tokens": tokens,
                  "sampled_tokens": sampled_tokens, "lrm": lrm, "gen_s": t1 - t0, "train_s": t2 - t1},
                 {"train/reward": state.mean_reward, "train/loss": loss_value, "train/lrm": lrm})

    if state.step == num_iterations and master:
        get_report().log("Chat RL", [vars(args), {
            "source step": meta["step"], "steps": num_iterations, "first step mean reward": state.first_reward,
            "last step mean reward": state.mean_reward,
            **{f"GSM8K {k} ({args.eval_problems} problems)": v for k, v in state.eval.items()},
            "share of time generating": state.gen_time / max(state.train_time, 1e-9),
            "training time (min)": state.train_time / 60}])
    stop.finish(state, num_iterations, log)


if __name__ == "__main__":
    main()
