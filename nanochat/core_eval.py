"""
The CORE metric (DCLM): the mean over 22 in-context-learning tasks of the centered accuracy
(acc - baseline) / (1 - baseline), as specified in shared/data/core/TASKS.md.

Three task types, each item scored as one small batch of sequences, BOS first:
- multiple_choice: fewshot + query + delimiter + choice, for each choice; the prediction is the
  choice with the lowest mean loss over its own tokens.
- schema: fewshot + context_option + delimiter + continuation, for each option; the prediction is
  the option under which the continuation has the lowest mean loss.
- language_modeling: fewshot + context + delimiter + continuation; correct iff the argmax at every
  continuation position is the continuation's token.
Few-shot examples come from the same file, never the item itself, drawn with random.Random(1234 + i)
for item i, each rendered with its gold answer, separated by blank lines. Where the context and the
continuation meet, BPE may merge across the boundary, so the continuation's tokens are those after
the longest common prefix of the tokenized prefix and the tokenized whole. Too-long sequences lose
tokens from the left (the continuation is always kept).

Distributed: rank r scores items r, r + W, ...; (correct, total) counts are summed over ranks.
"""

import http.client
import json
import os
import random
import urllib.error
import urllib.request
import zipfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import FetchError, atomic_write, get_base_dir, local_data_dir

# label, file, type, shots, delimiter, random baseline (%)
CORE_TASKS = [
    ("hellaswag_zeroshot", "language_understanding/hellaswag.jsonl", "multiple_choice", 0, " ", 25),
    ("jeopardy", "world_knowledge/jeopardy_all.jsonl", "language_modeling", 10, "\nAnswer: ", 0),
    ("bigbench_qa_wikidata", "world_knowledge/bigbench_qa_wikidata.jsonl", "language_modeling", 10, " ", 0),
    ("arc_easy", "world_knowledge/arc_easy.jsonl", "multiple_choice", 10, "\nAnswer: ", 25),
    ("arc_challenge", "world_knowledge/arc_challenge.jsonl", "multiple_choice", 10, "\nAnswer: ", 25),
    ("copa", "commonsense_reasoning/copa.jsonl", "multiple_choice", 0, " ", 50),
    ("commonsense_qa", "commonsense_reasoning/commonsense_qa.jsonl", "multiple_choice", 10, " ", 20),
    ("piqa", "commonsense_reasoning/piqa.jsonl", "multiple_choice", 10, "\nAnswer: ", 50),
    ("openbook_qa", "commonsense_reasoning/openbook_qa.jsonl", "multiple_choice", 0, " ", 25),
    ("lambada_openai", "language_understanding/lambada_openai.jsonl", "language_modeling", 0, " ", 0),
    ("hellaswag", "language_understanding/hellaswag.jsonl", "multiple_choice", 10, " ", 25),
    ("winograd", "language_understanding/winograd_wsc.jsonl", "schema", 0, " ", 50),
    ("winogrande", "language_understanding/winogrande.jsonl", "schema", 0, " ", 50),
    ("bigbench_dyck_languages", "symbolic_problem_solving/bigbench_dyck_languages.jsonl", "language_modeling", 10, " ", 0),
    ("agi_eval_lsat_ar", "symbolic_problem_solving/agi_eval_lsat_ar.jsonl", "multiple_choice", 3, " ", 20),
    ("bigbench_cs_algorithms", "symbolic_problem_solving/bigbench_cs_algorithms.jsonl", "language_modeling", 10, " ", 0),
    ("bigbench_operators", "symbolic_problem_solving/bigbench_operators.jsonl", "language_modeling", 10, " ", 0),
    ("bigbench_repeat_copy_logic", "symbolic_problem_solving/bigbench_repeat_copy_logic.jsonl", "language_modeling", 10, " ", 0),
    ("squad", "reading_comprehension/squad.jsonl", "language_modeling", 10, " ", 0),
    ("coqa", "reading_comprehension/coqa.jsonl", "language_modeling", 0, " ", 0),
    ("boolq", "reading_comprehension/boolq.jsonl", "multiple_choice", 10, "\nAnswer: ", 62),
    # DCLM's metadata says 9.1 (the original 11-way task); the files here have 4 choices: chance is 25
    ("bigbench_language_identification", "language_understanding/bigbench_language_identification.jsonl", "multiple_choice", 10, " ", 25),
]
BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"


def core_data_dir():
    """The folder holding <category>/<file>: NANOCHAT_LOCAL_DATA/core, or the eval bundle (downloaded once)."""
    local = local_data_dir()
    if local is not None:
        return os.path.join(local, "core")
    root = os.path.join(get_base_dir(), "eval_bundle")
    for candidate in (os.path.join(root, "eval_bundle", "eval_data"), os.path.join(root, "eval_data"), root):
        if os.path.isdir(os.path.join(candidate, "world_knowledge")):
            return candidate
    url = os.environ.get("NANOCHAT_EVAL_BUNDLE_URL", BUNDLE_URL)
    print(f"downloading the CORE eval bundle from {url}")
    zip_path = root + ".zip"
    try:
        with urllib.request.urlopen(url, timeout=120) as response, atomic_write(zip_path, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise FetchError("the CORE eval bundle", url, getattr(e, "reason", None) or e,
                         "NANOCHAT_EVAL_BUNDLE_URL to a mirror of eval_bundle.zip, http(s):// or file://") from e
    try:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(root)
    except zipfile.BadZipFile as e:
        os.remove(zip_path)
        raise ValueError(f"the eval bundle from {url} is not a valid zip ({e}); deleted, run again") from e
    for candidate in (os.path.join(root, "eval_bundle", "eval_data"), os.path.join(root, "eval_data"), root):
        if os.path.isdir(os.path.join(candidate, "world_knowledge")):
            return candidate
    raise FileNotFoundError(f"the eval bundle extracted into {root} has no world_knowledge/ folder")


def load_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def fewshot_indices(n, index, shots):
    """`shots` other items, drawn with a fixed seed per item (fewer if the file is small)."""
    candidates = [j for j in range(n) if j != index]
    return random.Random(1234 + index).sample(candidates, min(shots, len(candidates)))


def render_item(rows, index, task_type, shots, delimiter):
    """-> (prefixes, continuations, gold): the text pairs to score for item `index` (strings, no BOS)."""
    item = rows[index]
    examples = [rows[j] for j in fewshot_indices(len(rows), index, shots)]
    if task_type == "multiple_choice":
        shown = [e["query"] + delimiter + e["choices"][e["gold"]] for e in examples]
        head = "".join(s + "\n\n" for s in shown)
        return [head + item["query"] + delimiter] * len(item["choices"]), list(item["choices"]), item["gold"]
    if task_type == "schema":
        shown = [e["context_options"][e["gold"]] + delimiter + e["continuation"] for e in examples]
        head = "".join(s + "\n\n" for s in shown)
        return [head + c + delimiter for c in item["context_options"]], [item["continuation"]] * len(item["context_options"]), item["gold"]
    if task_type == "language_modeling":
        shown = [e["context"] + delimiter + e["continuation"] for e in examples]
        head = "".join(s + "\n\n" for s in shown)
        return [head + item["context"] + delimiter], [item["continuation"]], 0
    raise ValueError(f"unknown task type {task_type!r}")


def tokenize_pairs(tokenizer, prefixes, continuations, max_len):
    """-> list of (ids, start, end): BOS + tokens of prefix+continuation; [start, end) is the continuation."""
    bos = tokenizer.get_bos_token_id()
    out = []
    whole = tokenizer.encode([p + c for p, c in zip(prefixes, continuations)], prepend=bos)
    heads = tokenizer.encode(list(prefixes), prepend=bos)
    for ids, head in zip(whole, heads):
        start = 0
        while start < min(len(ids), len(head)) and ids[start] == head[start]:
            start += 1
        start = min(start, len(ids) - 1)  # at least one continuation token
        if len(ids) > max_len:  # drop from the left, keep the continuation (and BOS first)
            cut = len(ids) - max_len
            ids = [bos] + ids[1 + cut:]
            start = max(1, start - cut)
        out.append((ids, start, len(ids)))
    return out


@torch.no_grad()
def score_sequences(model, sequences, pad_id, batch_size=32):
    """For each (ids, start, end): (mean loss over [start, end), all continuation tokens are argmax).
    Sequences are batched in length order (little padding), results returned in input order."""
    device = model.get_device()
    results = [None] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        T = max(len(sequences[i][0]) for i in chunk)
        x = torch.full((len(chunk), T), pad_id, dtype=torch.long, device=device)
        for r, i in enumerate(chunk):
            ids = sequences[i][0]
            x[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        logits = model(x)  # (B, T, V); padding is on the right, so causality keeps it harmless
        for r, i in enumerate(chunk):
            _, start, end = sequences[i]
            # token t is predicted at position t - 1; only the continuation's positions are scored
            span_logits = logits[r, start - 1:end - 1].float()
            targets = x[r, start:end]
            loss = F.cross_entropy(span_logits, targets).item()
            results[i] = (loss, bool((span_logits.argmax(dim=-1) == targets).all()))
    return results


def evaluate_task(model, tokenizer, rows, task_type, shots, delimiter, max_len, indices, batch_size=32):
    """Correct count over `indices` of one task."""
    correct = 0
    pending = []  # (gold, n_sequences) per item, sequences batched across items
    sequences = []

    def flush():
        nonlocal correct
        scores = score_sequences(model, sequences, tokenizer.get_bos_token_id(), batch_size)
        k = 0
        for gold, n in pending:
            item_scores = scores[k:k + n]
            k += n
            if task_type == "language_modeling":
                correct += int(item_scores[0][1])
            else:
                correct += int(min(range(n), key=lambda j: item_scores[j][0]) == gold)
        pending.clear()
        sequences.clear()

    for index in indices:
        prefixes, continuations, gold = render_item(rows, index, task_type, shots, delimiter)
        seqs = tokenize_pairs(tokenizer, prefixes, continuations, max_len)
        pending.append((gold, len(seqs)))
        sequences.extend(seqs)
        if len(sequences) >= batch_size:
            flush()
    if sequences:
        flush()
    return correct


def evaluate_core(model, tokenizer, max_per_task=-1, batch_size=32, log=print):
    """-> {"tasks": {label: {accuracy, centered, baseline, n}}, "absent": [...], "core": mean centered}."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    data_dir = core_data_dir()
    max_len = model.config.sequence_len
    results, absent = {}, []
    for label, rel, task_type, shots, delimiter, baseline in CORE_TASKS:
        path = os.path.join(data_dir, rel)
        if not os.path.exists(path):
            absent.append(label)
            continue
        rows = load_rows(path)
        n = len(rows) if max_per_task is None or max_per_task < 0 else min(len(rows), max_per_task)
        indices = list(range(rank, n, world))
        correct = evaluate_task(model, tokenizer, rows, task_type, shots, delimiter, max_len, indices, batch_size)
        counts = torch.tensor([correct, len(indices)], dtype=torch.long, device=model.get_device())
        if world > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, total = counts.tolist()
        accuracy = correct / max(total, 1)
        base = baseline / 100
        results[label] = {"accuracy": accuracy, "centered": (accuracy - base) / (1 - base), "baseline": baseline,
                          "n": total}
        log(f"{label:<34} {task_type:<18} shots {shots:>2}  acc {accuracy:.4f}  centered {results[label]['centered']:+.4f}  (n={total})")
    core = sum(r["centered"] for r in results.values()) / max(len(results), 1)
    return {"tasks": results, "absent": absent, "core": core, "present": len(results), "total": len(CORE_TASKS)}
