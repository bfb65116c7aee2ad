"""
HumanEval: 164 Python functions to complete. The user gives the signature and docstring; the
assistant answers with the whole function in a ```python block. Evaluation runs the completion
against the problem's tests in the sandbox (nanochat.sandbox); see `evaluate` for what a pass means
and what in-process grading cannot stop.
"""

import gzip
import json
import re

from tasks.common import Task, check_count, load_hub, local_data_file, use_local

COUNT = 164


def extract_code(completion):
    """The first ```python block of a reply, else the whole reply."""
    m = re.search(r"```(?:python)?\n(.*?)(?:```|$)", completion, re.S)
    return m.group(1) if m else completion


class HumanEval(Task):
    eval_type = "generative"

    def __init__(self, timeout=10.0, **kwargs):
        super().__init__(**kwargs)
        self.timeout = timeout
        if use_local():
            path = local_data_file("humaneval", "HumanEval.jsonl.gz")
            with gzip.open(path, "rt", encoding="utf-8") as f:
                self.rows = [json.loads(line) for line in f if line.strip()]
        else:
            path = "the hub"
            self.rows = [dict(r) for r in load_hub("openai/openai_humaneval", None, "test")]
        check_count(self.rows, COUNT, "HumanEval", path)

    def num_examples(self):
        return len(self.rows)

    def get_example(self, index):
        row = self.rows[index]
        solution = row["prompt"] + row["canonical_solution"]
        return {"messages": [{"role": "user", "content": f"Complete this Python function.\n\n```python\n{row['prompt']}```"},
                             {"role": "assistant", "content": f"```python\n{solution}```"}],
                "entry_point": row["entry_point"], "test": row["test"], "prompt": row["prompt"], "task_id": row["task_id"]}

    def program(self, conversation, completion):
        code = extract_code(completion)
        # the prompt's imports (e.g. `from typing import List`) may be missing from the answer
        imports = "\n".join(l for l in conversation["prompt"].splitlines() if l.startswith(("import ", "from ")))
        return f"{imports}\n{code}\n\n{conversation['test']}\n\ncheck({conversation['entry_point']})\n"

    def evaluate(self, conversation, completion):
        """Passes only if the program exited 0 and its code ran to the end (ExecutionResult.completed: the
        sandbox's token, which never enters program.py, its globals or its code's constants), so a
        completion that exits early (sys.exit(0), os._exit(0)) fails. In-process evidence, never proof: a
        program that inspects its own interpreter (frames, gc, ctypes, /proc/self/mem) can still find the
        token, and one that returns objects whose __eq__ is always True, or patches what the tests call,
        passes them. Fine for measuring an honest model; NOT an RL reward without checks that run
        outside the program's process."""
        from nanochat.sandbox import execute_code
        result = execute_code(self.program(conversation, completion), timeout=self.timeout)
        return int(result.success and result.completed)
