"""
General multi-turn conversations. Online: SmolTalk (HuggingFaceTB/smol-smoltalk). Offline
(NANOCHAT_LOCAL_DATA) there is no SmolTalk; the same interface serves the real dialogues there:
Schema-Guided Dialogue (USER/SYSTEM turns -> user/assistant) and, when the folder has it,
Self-Instruct (instruction + input -> user, output -> assistant; tests/data leaves it out, being
Apache-2.0). The offline split: every 10th conversation is test.

HHRLHF reads Anthropic's harmless-base red-team transcripts. It is for format tests only and is
never part of a default training mixture (it holds offensive text by design).
"""

import glob
import gzip
import json
import os

from tasks.common import Task, load_hub, local_data_dir, local_data_file, use_local


def _sgd_conversations(root):
    files = sorted(glob.glob(os.path.join(root, "chat", "sgd", "test", "dialogues_*.json.gz")))
    if not files:
        raise FileNotFoundError(f"no chat/sgd/test/dialogues_*.json.gz under NANOCHAT_LOCAL_DATA={root}")
    out = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for dialogue in json.load(f):
                messages = []
                for turn in dialogue["turns"]:
                    role = "user" if turn["speaker"] == "USER" else "assistant"
                    if messages and messages[-1]["role"] == role:  # merge consecutive turns of one speaker
                        messages[-1]["content"] += "\n" + turn["utterance"]
                    else:
                        messages.append({"role": role, "content": turn["utterance"]})
                if messages and messages[-1]["role"] == "user":
                    messages.pop()  # end on the assistant
                if len(messages) >= 2:
                    out.append(messages)
    return out


def _self_instruct_conversations(root):
    out = []
    if not os.path.isdir(os.path.join(root, "chat", "self-instruct")):
        return out
    for name in ("seed_tasks.jsonl", "user_oriented_instructions.jsonl"):
        with open(local_data_file("chat", "self-instruct", name), encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                for instance in row["instances"]:
                    if not instance["output"].strip():
                        continue
                    user = row["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")
                    out.append([{"role": "user", "content": user}, {"role": "assistant", "content": instance["output"]}])
    return out


class SmolTalk(Task):
    eval_type = "generative"

    def __init__(self, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"split must be train or test, got {split!r}")
        if use_local():
            sgd, instruct = _sgd_conversations(local_data_dir()), _self_instruct_conversations(local_data_dir())
            self.rows = [c for i, c in enumerate(sgd + instruct) if (i % 10 == 0) == (split == "test")]
            self.source = "offline stand-in: SGD dialogues" + (" + Self-Instruct" if instruct else "")
        else:
            data = load_hub("HuggingFaceTB/smol-smoltalk", None, split)
            self.rows = [[{"role": m["role"], "content": m["content"]} for m in r["messages"]] for r in data]
            self.source = "HuggingFaceTB/smol-smoltalk"

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.rows[index]]}


class HHRLHF(Task):
    """Red-team transcripts (tests only; never in a default mixture)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        path = local_data_file("chat", "hh-rlhf", "harmless-base", "test.jsonl.gz")
        self.rows = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                messages = []
                for chunk in json.loads(line)["chosen"].split("\n\nHuman: ")[1:]:
                    human, _, assistant = chunk.partition("\n\nAssistant: ")
                    messages += [{"role": "user", "content": human.strip()}, {"role": "assistant", "content": assistant.strip()}]
                if messages and all(m["content"] for m in messages):
                    self.rows.append(messages)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.rows[index]]}
