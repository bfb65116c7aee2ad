"""
GSM8K: grade-school math word problems with worked answers. The answers' calculator annotations
`<<48/2=24>>` become tool calls: the assistant writes <|python_start|>48/2<|python_end|>, the tool
writes <|output_start|>24<|output_end|> (not trained on), so the model learns to use its calculator.
The final answer follows `####`.
"""

import json
import re

from tasks.common import Task, check_count, load_hub, local_data_file, open_text, use_local

COUNTS = {"train": 7473, "test": 1319}
ANNOTATION = re.compile(r"<<([^<>]*)=([^<>]*)>>")


def answer_to_parts(answer):
    """The answer text -> assistant parts: text, then python/python_output for each annotation, ..."""
    parts, pos = [], 0
    for m in ANNOTATION.finditer(answer):
        if m.start() > pos:
            parts.append({"type": "text", "text": answer[pos:m.start()]})
        parts.append({"type": "python", "text": m.group(1)})
        parts.append({"type": "python_output", "text": m.group(2)})
        pos = m.end()
    if pos < len(answer):
        parts.append({"type": "text", "text": answer[pos:]})
    return parts


def parts_to_answer(parts):
    """The inverse of answer_to_parts (for checking the conversion on real data)."""
    out, i = [], 0
    while i < len(parts):
        if parts[i]["type"] == "python":
            out.append(f"<<{parts[i]['text']}={parts[i + 1]['text']}>>")
            i += 2
        else:
            out.append(parts[i]["text"])
            i += 1
    return "".join(out)


def extract_answer(text):
    """The number after the last '####' (commas and a trailing period removed), or None."""
    m = re.findall(r"####\s*(-?[\d,]*\.?\d+)", text)
    if not m:
        return None
    return m[-1].replace(",", "").rstrip(".")


def same_number(a, b):
    try:
        return abs(float(a) - float(b)) < 1e-6
    except (TypeError, ValueError):
        return False


class GSM8K(Task):
    eval_type = "generative"

    def __init__(self, subset="main", split="test", **kwargs):
        super().__init__(**kwargs)
        if subset != "main" or split not in COUNTS:
            raise ValueError(f"GSM8K subset/split {subset}/{split} unknown; use main/train|test")
        if use_local():
            path = local_data_file("gsm8k", f"{split}.jsonl")  # or .jsonl.gz
            with open_text(path) as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        else:
            path = "the hub"
            self.rows = [dict(r) for r in load_hub("openai/gsm8k", "main", split)]
        check_count(self.rows, COUNTS[split], f"GSM8K {split}", path)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        return {"messages": [{"role": "user", "content": row["question"]},
                             {"role": "assistant", "content": answer_to_parts(row["answer"])}]}

    def well_formed(self, completion):
        """Whether the completion ends its work with a final '#### <number>' line (right or wrong)."""
        return extract_answer(completion) is not None

    def evaluate(self, conversation, completion):
        parts = conversation["messages"][-1]["content"]
        gold = extract_answer(parts_to_answer(parts) if isinstance(parts, list) else parts)
        return int(same_number(extract_answer(completion), gold))
