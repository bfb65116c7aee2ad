"""
Raw text completion with log-probabilities: the OpenAI legacy /v1/completions semantics that
lm-evaluation-harness's `local-completions` model relies on.

A prompt (text, or token ids) is scored after an implicit <|bos|> (every training document began
with one) unless it already starts with it. With echo, the prompt's tokens come back with the
log-probability of each given what precedes it; then max_tokens tokens are sampled (tools off: this
is plain language modelling) and come back with theirs. Log-probabilities are of the model's own
distribution (log-softmax of the soft-capped logits), whatever the sampling temperature; the
harness sends max_tokens=1, echo, logprobs=1 and sums token_logprobs[ctxlen:-1].
"""

import torch
import torch.nn.functional as F


def token_strings(tokenizer, ids):
    return [tokenizer.decode([t]) for t in ids]


@torch.no_grad()
def complete(engine, tokenizer, prompt_ids, max_tokens, temperature, top_p, seed, logprobs, echo, stop, autocast):
    """One choice for one prompt: {"text", "finish_reason", "logprobs" (or None), "prompt_tokens", "completion_tokens"}."""
    model = engine.model
    bos = tokenizer.get_bos_token_id()
    context = prompt_ids if prompt_ids and prompt_ids[0] == bos else [bos] + prompt_ids
    offset = len(context) - len(prompt_ids)  # 1 when the BOS was implicit
    new = []
    if max_tokens > 0:
        with autocast:
            rows, _ = engine.generate_batch(context, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                            seed=seed, tools=False)
        new = rows[0][len(context):]
    finish = "stop" if len(new) < max_tokens else "length"  # fewer tokens than asked: a stop token ended it
    text = tokenizer.decode(new)
    for s in stop:
        if s in text:
            text, finish = text[:text.index(s)], "stop"
            # the tokens kept are the shortest prefix whose text covers the cut text
            kept = 0
            while kept < len(new) and len(tokenizer.decode(new[:kept])) < len(text):
                kept += 1
            new = new[:kept]
    choice = {"text": (tokenizer.decode(prompt_ids) if echo else "") + text, "finish_reason": finish,
              "prompt_tokens": len(prompt_ids), "completion_tokens": len(new), "logprobs": None}
    if logprobs is None:
        return choice
    sequence = context + new
    with autocast:
        logits = model(torch.tensor([sequence], dtype=torch.long, device=model.get_device()))[0].float()
    logp = F.log_softmax(logits, dim=-1)  # logp[i] predicts sequence[i + 1]
    first = offset if echo else len(context)  # positions of the tokens reported
    ids = sequence[first:]
    token_logprobs, top_logprobs = [], []
    for pos in range(first, len(sequence)):
        if pos == 0:  # the first token, with nothing before it
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        row = logp[pos - 1]
        token_logprobs.append(row[sequence[pos]].item())
        if logprobs > 0:
            values, indices = row.topk(logprobs)
            top = {}
            for v, i in zip(values.tolist(), indices.tolist()):
                top.setdefault(tokenizer.decode([i]), v)  # two ids may decode alike: keep the likelier
            top_logprobs.append(top)
        else:
            top_logprobs.append({})
    strings = token_strings(tokenizer, ids)
    offsets, position = [], 0
    for s in strings:
        offsets.append(position)
        position += len(s)
    choice["logprobs"] = {"tokens": strings, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                          "text_offset": offsets}
    return choice
