"""
Scoring a chat model on the chat tasks: shared by chat_eval (the full evaluation), chat_sft (a quick
accuracy during training) and chat_rl (pass@1 / pass@k on GSM8K).

Categorical tasks (ARC, MMLU) are scored from the logits of the allowed answer letters only, at the
position after <|assistant_start|>, many prompts per forward pass. Generative tasks (GSM8K,
HumanEval, SpellingBee) sample k completions with the engine, tool use on, and check each one.
Each rank takes every world_size-th problem; counts are summed over ranks, so 2 ranks == 1 rank.
The tasks themselves (and chat_eval's names for them) are tasks/; this module only takes a task object.
"""

import torch
import torch.distributed as dist

from nanochat.common import print0


def my_indices(n, rank, world_size, max_problems):
    """This rank's problem indices (every world_size-th of the first max_problems) and the total."""
    n = n if max_problems is None or max_problems < 0 else min(n, max_problems)
    return list(range(rank, n, world_size)), n


@torch.no_grad()
def run_categorical(task, model, tokenizer, indices, batch_size, autocast):
    """Correct count over `indices`: argmax over the allowed letters' logits at the answer position."""
    device = model.get_device()
    pad = tokenizer.get_bos_token_id()
    correct = 0
    for start in range(0, len(indices), batch_size):
        conversations = [task[i] for i in indices[start:start + batch_size]]
        prompts = [tokenizer.render_for_completion(c) for c in conversations]
        longest = max(len(p) for p in prompts)
        batch = torch.full((len(prompts), longest), pad, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            batch[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)  # right padding: causal, harmless
        with autocast:
            logits = model(batch)
        for row, (conversation, prompt) in enumerate(zip(conversations, prompts)):
            letters = conversation.get("letters") or task.letters
            letter_ids = []
            for letter in letters:
                ids = tokenizer.encode(letter)
                if len(ids) != 1:
                    raise ValueError(f"answer letter {letter!r} is not a single token")
                letter_ids.append(ids[0])
            scores = logits[row, len(prompt) - 1, letter_ids]
            predicted = letters[scores.argmax().item()]
            correct += int(bool(task.evaluate(conversation, predicted)))
    return correct


def run_generative(task, engine, tokenizer, indices, num_samples, max_new_tokens, temperature, top_k, autocast,
                   seed=1000, progress_every=25):
    """
    Samples num_samples completions per problem. Returns counts: "solved" (problems where any sample
    is right: the pass@k numerator), "sample_correct" (right samples in all: pass@1 = that / (n k))
    and "well_formed" (samples in the task's answer format, for tasks that define well_formed).
    """
    counts = {"solved": 0, "sample_correct": 0, "well_formed": 0}
    well_formed = getattr(task, "well_formed", None)
    for n, i in enumerate(indices):
        conversation = task[i]
        prompt = tokenizer.render_for_completion(conversation)
        with autocast:
            rows, _ = engine.generate_batch(prompt, num_samples=num_samples, max_tokens=max_new_tokens,
                                            temperature=temperature, top_k=top_k, seed=seed + i)
        completions = [tokenizer.decode(row[len(prompt):]) for row in rows]
        outcomes = [bool(task.evaluate(conversation, c)) for c in completions]
        counts["solved"] += int(any(outcomes))
        counts["sample_correct"] += sum(outcomes)
        if well_formed is not None:
            counts["well_formed"] += sum(bool(well_formed(c)) for c in completions)
        if progress_every and (n + 1) % progress_every == 0:
            print0(f"  {n + 1}/{len(indices)} problems on rank 0, {counts['solved']} solved")
    return counts


def evaluate_task(task, model, engine, tokenizer, autocast, max_problems=-1, batch_size=8, num_samples=1,
                  max_new_tokens=512, temperature=0.0, top_k=50, seed=1000, progress_every=25):
    """
    One task over every rank. Returns {"accuracy", "correct", "total"} and for generative tasks also
    "pass@1" (mean over samples), "pass@k" (any of the k samples; equals accuracy) and, where the task
    defines well_formed, "well-formed" (the share of samples in the answer format).
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    indices, total = my_indices(len(task), rank, world, max_problems)
    if task.eval_type == "categorical":
        correct = run_categorical(task, model, tokenizer, indices, batch_size, autocast)
        counts = {"solved": correct, "sample_correct": correct, "well_formed": 0}
        samples = 1
    else:
        counts = run_generative(task, engine, tokenizer, indices, num_samples, max_new_tokens, temperature, top_k,
                                autocast, seed, progress_every)
        samples = num_samples
    keys = ["solved", "sample_correct", "well_formed"]
    summed = torch.tensor([counts[k] for k in keys] + [len(indices)], dtype=torch.long, device=model.get_device())
    if world > 1:
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    *values, evaluated = summed.tolist()
    counts = dict(zip(keys, values))
    if evaluated != total:
        raise RuntimeError(f"ranks evaluated {evaluated} problems, expected {total}")
    result = {"accuracy": counts["solved"] / max(total, 1), "correct": counts["solved"], "total": total}
    if task.eval_type != "categorical":
        result[f"pass@{samples}"] = result["accuracy"]
        result["pass@1"] = counts["sample_correct"] / max(total * samples, 1)
        if getattr(task, "well_formed", None) is not None:
            result["well-formed"] = counts["well_formed"] / max(total * samples, 1)
    return result
