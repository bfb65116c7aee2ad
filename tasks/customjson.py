"""Conversations from a jsonl file, one conversation per line as a list of {"role", "content"} messages."""

import json

from tasks.common import Task


class CustomJSON(Task):
    eval_type = "generative"

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                messages = json.loads(line)
                if not isinstance(messages, list) or len(messages) < 2 or not all(
                        isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                        for m in messages):
                    raise ValueError(f"{path}:{n}: expected a list of at least 2 {{role, content}} messages")
                self.rows.append(messages)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        return {"messages": [dict(m) for m in self.rows[index]]}
