"""
The pieces of on-policy RL with group-relative advantages (used by scripts/chat_rl.py).

For each prompt the engine samples k completions (tool use on); each gets a reward; its advantage is
reward - mean reward of its group. The loss is the policy gradient on the sampled tokens only:

    loss = - sum over sampled tokens t of  A(row of t) * log p(t)  /  (number of those tokens)

which is nanochat.training's token-weighted objective with per-row weights A (the cross-entropy is
-log p). Prompt tokens and tokens the calculator tool forced into the sequence have mask 0: the model
did not choose them, so they get no credit or blame.

Simplified from GRPO (DeepSeekMath), on purpose:
- no KL penalty to a reference model: the runs are short and start from the SFT model; dropping it
  saves a second model's memory and forward passes;
- no PPO ratio or clipping: every rollout is trained on exactly once, right after it was sampled, by
  the weights that sampled it, so the importance ratio is 1 and clipping never acts;
- advantages are not divided by the group's reward std (that up-weights groups that are almost all
  right or all wrong; with binary rewards it mostly adds noise), and the loss is normalised per
  token over the whole step (not per sequence first), so long answers are not down-weighted;
- rows whose advantage is 0 (groups where every sample got the same reward) are dropped before the
  forward pass: they would contribute exactly zero gradient, so this only saves compute. The
  token count that normalises the loss is over the rows that remain.
"""

import torch

from nanochat.dataloader import conversation_batch


def group_advantages(rewards):
    """reward - mean reward of the group (a float32 tensor)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return r - r.mean()


def rollout(engine, prompt, num_samples, max_tokens, temperature=1.0, top_k=None, seed=0):
    """
    k completions of one prompt. Returns (sequences, masks, completions): each sequence is the
    prompt plus every generated token (a sampled stop token included: stopping is a choice too),
    its mask 1 exactly on sampled tokens, and the decoded text of each completion without the stop.
    """
    sequences, masks = engine.generate_batch(prompt, num_samples=num_samples, keep_stop=True, max_tokens=max_tokens,
                                             temperature=temperature, top_k=top_k, seed=seed)
    completions = []
    for seq, mask in zip(sequences, masks):
        new = seq[len(prompt):]
        if new and mask[-1] and new[-1] in engine.stop_ids:  # a sampled stop ends the row: not part of the text
            new = new[:-1]
        completions.append(engine.tokenizer.decode(new))
    return sequences, masks, completions


def pg_micro_batches(sequences, masks, advantages, pad_id, device_batch_size, device="cpu"):
    """
    The rows with a nonzero advantage as micro-batches (x, y, advantages) for training.accumulate_gradients:
    x the inputs, y the next tokens with -1 where the token was not sampled (prompt, tool output,
    padding), advantages (B,). Rows are padded on the right to the longest of their micro-batch.
    """
    rows = [(s, m, float(a)) for s, m, a in zip(sequences, masks, advantages) if float(a) != 0.0]
    batches = []
    for start in range(0, len(rows), device_batch_size):
        chunk = rows[start:start + device_batch_size]
        longest = max(len(s) for s, _, _ in chunk)
        # one sequence per row (its first token is the prompt's, never a target), padded to the longest
        x, y = conversation_batch([[(s, m)] for s, m, _ in chunk], longest, pad_id, device)
        batches.append((x, y, torch.tensor([a for _, _, a in chunk], dtype=torch.float32, device=device)))
    return batches
