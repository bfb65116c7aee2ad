"""MMLU: 57 subjects of multiple-choice questions; auxiliary_train (other MC sets) for midtraining."""

import csv
import os

from tasks.common import MultipleChoiceTask, check_count, load_hub, local_data_dir, mc_conversation, use_local

COUNTS = {("all", "test"): 14042, ("all", "validation"): 1531, ("all", "dev"): 285,
          ("auxiliary_train", "train"): 99842}
LOCAL_COUNTS = {**COUNTS, ("auxiliary_train", "train"): 1218}  # 2 of its 8 source files here
LOCAL_DIRS = {"test": "test", "validation": "val", "dev": "dev", "train": "auxiliary_train"}


def read_hendrycks_csv(path, subject):
    """Original layout: no header; question, four choices, answer letter."""
    with open(path, encoding="utf-8", newline="") as f:
        return [(row[0], row[1:5], "ABCD".index(row[5].strip()), subject) for row in csv.reader(f) if row]


def read_headered_csv(path, subject):
    """The layout of test_5_subjects_haechan: header question,choice0..choice3,answer with answer 0-3."""
    with open(path, encoding="utf-8", newline="") as f:
        return [(r["question"], [r[f"choice{i}"] for i in range(4)], int(r["answer"]), subject) for r in csv.DictReader(f)]


class MMLU(MultipleChoiceTask):
    def __init__(self, subset="all", split="test", **kwargs):
        super().__init__(**kwargs)
        if (subset, split) not in COUNTS:
            raise ValueError(f"MMLU subset/split {subset}/{split} unknown; use all/test|validation|dev or auxiliary_train/train")
        self.rows = []
        if use_local():
            folder = os.path.join(local_data_dir(), "mmlu", LOCAL_DIRS[split])
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{folder} is missing from NANOCHAT_LOCAL_DATA={local_data_dir()}")
            for name in sorted(os.listdir(folder)):
                if name.endswith(".csv"):
                    subject = name.rsplit("_", 1)[0] if split != "train" else name[:-4]
                    self.rows += read_hendrycks_csv(os.path.join(folder, name), subject)
            if split == "test":  # the 5 subjects missing above come in a headered layout
                extra = os.path.join(local_data_dir(), "mmlu", "test_5_subjects_haechan")
                for name in sorted(os.listdir(extra)):
                    if name.endswith(".csv"):
                        self.rows += read_headered_csv(os.path.join(extra, name), name.rsplit("_", 1)[0])
            check_count(self.rows, LOCAL_COUNTS[(subset, split)], f"MMLU {subset} {split}", folder)
            if split == "train" and len(self.rows) == LOCAL_COUNTS[(subset, split)]:
                print(f"note: the local MMLU auxiliary_train has {len(self.rows)} of its {COUNTS[(subset, split)]} rows")
        else:
            data = load_hub("cais/mmlu", subset, split)
            self.rows = [(r["question"], list(r["choices"]), int(r["answer"]), r.get("subject", "")) for r in data]
            check_count(self.rows, COUNTS[(subset, split)], f"MMLU {subset} {split}", "the hub")

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        question, choices, gold, subject = self.rows[index]
        conversation = mc_conversation(question, choices, gold)
        conversation["subject"] = subject
        return conversation
