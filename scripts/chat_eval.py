"""
Evaluate a chat model on the chat tasks, and ChatCORE.

    python -m scripts.chat_eval -i sft                              # every task
    python -m scripts.chat_eval -i mid -a "ARC-Easy|GSM8K" --max-problems 100
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -- -i sft

Categorical tasks (ARC, MMLU) are scored from the logits of the allowed answer letters only, at the
position after <|assistant_start|>, many prompts per forward pass. Generative tasks (GSM8K,
HumanEval, SpellingBee) sample with the engine, tool use on, and check the answer or run the tests
in the sandbox; with --num-samples k a problem counts as solved when any of its k samples is
(pass@k). ChatCORE = mean over the evaluated tasks of the centered accuracy
(acc - chance) / (1 - chance), chance = 1/4 for the 4-way multiple-choice tasks and 0 for the
generative ones. Each rank takes every world_size-th problem; counts are summed over ranks.
"""

import argparse
import time

from nanochat.checkpoint import add_checkpoint_args, load_model
from nanochat.common import autocast_ctx, compute_cleanup, compute_init, parse_dtype, print0
from nanochat.engine import Engine
from nanochat.report import get_report
from nanochat.sandbox import SandboxUnavailable
from nanochat.task_eval import evaluate_task
from tasks.catalog import task_registry

DEFAULT_TASKS = "ARC-Easy|ARC-Challenge|MMLU|GSM8K|HumanEval"


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a chat model on the chat tasks; ChatCORE.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_checkpoint_args(p, default_source="sft")
    p.add_argument("-a", "--tasks", default=DEFAULT_TASKS, help="'|'-separated task names")
    p.add_argument("--max-problems", type=int, default=-1, help="evaluate at most this many problems per task (-1: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per generative problem (pass@k)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="longest generated answer")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sampling top-k (0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass for categorical tasks")
    args = p.parse_args(argv)
    registry = task_registry()
    names = [n.strip() for n in args.tasks.split("|") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if unknown or not names:
        p.error(f"unknown task(s) {unknown}; choose from {'|'.join(registry)}")
    if args.num_samples < 1 or args.temperature < 0:
        p.error("--num-samples must be >= 1 and --temperature >= 0")
    if args.num_samples > 1 and args.temperature == 0:
        print0("note: --num-samples > 1 at temperature 0 gives identical samples")

    ddp, rank, local_rank, world_size, device = compute_init(args.device_type)
    autocast = autocast_ctx(device.type, parse_dtype(args.dtype, device.type))
    model, tokenizer, meta = load_model(args.source, device, phase="eval", model_tag=args.model_tag, step=args.step)
    engine = Engine(model, tokenizer)
    print0(f"ChatCORE = mean over the evaluated tasks of (accuracy - chance) / (1 - chance); "
           f"chance: {', '.join(f'{n} {registry[n][1]:.2f}' for n in names)}")

    results, centered, formats, skipped = {}, {}, {}, {}
    for name in names:
        t0 = time.time()
        make_task, chance = registry[name]
        task = make_task()
        try:
            result = evaluate_task(task, model, engine, tokenizer, autocast, max_problems=args.max_problems,
                                   batch_size=args.batch_size, num_samples=args.num_samples,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)
        except SandboxUnavailable as e:  # HumanEval needs the sandbox; the other tasks still count
            print0(f"{name}: skipped, left out of ChatCORE: {e}")
            skipped[name] = str(e)
            continue
        correct, total = result["correct"], result["total"]
        accuracy = correct / max(total, 1)
        results[name] = accuracy
        if "well-formed" in result:  # answers in the task's format, right or wrong: the first thing SFT teaches
            formats[f"{name} well-formed"] = result["well-formed"]
        centered[name] = (accuracy - chance) / (1 - chance)
        print0(f"{name}: {correct}/{total} = {100 * accuracy:.2f}% (centered {centered[name]:+.4f}) "
               f"in {time.time() - t0:.0f}s")
    if not centered:
        raise SystemExit(f"error: no task could be evaluated ({'; '.join(skipped.values())})")
    chatcore = sum(centered.values()) / len(centered)
    print0(f"ChatCORE over {len(centered)} task(s) ({', '.join(centered)}): {chatcore:.4f}")
    get_report().log(f"Chat evaluation {args.source}", [
        {"source": args.source, "step": meta["step"], "max problems": args.max_problems,
         "num samples": args.num_samples, "temperature": args.temperature},
        results, {"ChatCORE": chatcore, "ChatCORE tasks": ", ".join(centered)}, formats,
        {f"{name} skipped": why for name, why in skipped.items()}])
    compute_cleanup()


if __name__ == "__main__":
    main()
