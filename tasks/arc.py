"""ARC (AI2 Reasoning Challenge): grade-school science multiple choice, Easy and Challenge sets."""

import json

from tasks.common import MultipleChoiceTask, check_count, load_hub, local_data_file, mc_conversation, open_text, use_local

# hub counts; the local copy (shared/data, from GenMC) misses two ARC-Challenge test questions
COUNTS = {("ARC-Easy", "train"): 2251, ("ARC-Easy", "validation"): 570, ("ARC-Easy", "test"): 2376,
          ("ARC-Challenge", "train"): 1119, ("ARC-Challenge", "validation"): 299, ("ARC-Challenge", "test"): 1172}
LOCAL_COUNTS = {**COUNTS, ("ARC-Challenge", "test"): 1170}
LOCAL_SPLIT_FILES = {"train": "train.jsonl", "validation": "dev.jsonl", "test": "test.jsonl"}


class ARC(MultipleChoiceTask):
    def __init__(self, subset="ARC-Easy", split="test", **kwargs):
        super().__init__(**kwargs)
        if (subset, split) not in COUNTS:
            raise ValueError(f"ARC subset/split {subset}/{split} unknown; subsets ARC-Easy, ARC-Challenge; "
                             f"splits train, validation, test")
        self.rows = []
        if use_local():
            path = local_data_file("arc", subset, LOCAL_SPLIT_FILES[split])  # or .jsonl.gz
            with open_text(path) as f:
                for line in f:
                    r = json.loads(line)
                    q = r["question"]
                    self.rows.append((q["stem"], [c["text"] for c in q["choices"]], [c["label"] for c in q["choices"]],
                                      r["answerKey"]))
            check_count(self.rows, LOCAL_COUNTS[(subset, split)], f"ARC {subset} {split}", path)
            if len(self.rows) == LOCAL_COUNTS[(subset, split)] != COUNTS[(subset, split)]:
                print(f"note: the local ARC {subset} {split} has {len(self.rows)} questions, the hub "
                      f"{COUNTS[(subset, split)]} (two questions are missing from the local copy)")
        else:
            data = load_hub("allenai/ai2_arc", subset, split)
            for r in data:
                self.rows.append((r["question"], list(r["choices"]["text"]), list(r["choices"]["label"]), r["answerKey"]))
            check_count(self.rows, COUNTS[(subset, split)], f"ARC {subset} {split}", "the hub")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, choices, labels, answer = self.rows[index]
        # a few questions have 3 or 5 choices, or numeric labels: letters are re-assigned A, B, C, ...
        return mc_conversation(question, choices, labels.index(answer))
