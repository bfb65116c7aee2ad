"""
Datasets as chat tasks. A Task is a sized, sliceable list of conversations {"messages": [...]} with
an `eval_type` ("categorical": answer = one of `letters`; "generative": free text checked by
`evaluate`). TaskMixture and TaskSequence combine tasks for training.

Each task loads from the HuggingFace hub through `datasets`, or, when NANOCHAT_LOCAL_DATA names a
folder laid out like shared/data, from the native files there — the same Task code either way.
"""

import http.client
import json
import os
import random
import urllib.error
import urllib.request

from nanochat.common import FetchError, local_data_dir, local_data_file, open_text

SUBSET_FILE = "subset.json"
HUB_ENDPOINT = "https://huggingface.co"  # $HF_ENDPOINT overrides it, as it does for `datasets`

LETTERS = "ABCDEFGHIJ"


class Task:
    eval_type = "generative"
    letters = None

    def __init__(self, start=0, stop=None, step=1):
        if start < 0 or step < 1 or (stop is not None and stop < start):
            raise ValueError(f"bad task view start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, completion):
        raise NotImplementedError

    def __len__(self):
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, (stop - self.start + self.step - 1) // self.step)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step < 1:
                raise ValueError("task slices need a positive step")
            view = TaskView(self, start, stop, step)
            return view
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a task of {n}")
        return self.get_example(self.start + index * self.step)


class TaskView(Task):
    """A slice of another task (cheap: no copy)."""

    def __init__(self, task, start, stop, step):
        super().__init__()
        self.task, self.indices = task, range(start, stop, step)
        self.eval_type, self.letters = task.eval_type, task.letters

    def num_examples(self):
        return len(self.indices)

    def get_example(self, index):
        return self.task[self.indices[index]]

    def evaluate(self, conversation, completion):
        return self.task.evaluate(conversation, completion)


class TaskMixture(Task):
    """
    The union of several tasks in a deterministic shuffled order. A task listed twice (or given a
    repeat count in `repeats`) appears that many times. Conversations carry no task label; use
    `task_of(i)` to know where example i came from.
    """

    def __init__(self, tasks, repeats=None, seed=0x5EED, **kwargs):
        super().__init__(**kwargs)
        repeats = repeats or [1] * len(tasks)
        if len(repeats) != len(tasks) or any(r < 0 for r in repeats):
            raise ValueError("repeats must give a count >= 0 for every task")
        self.tasks = tasks
        self.index = [(t, i) for t, (task, r) in enumerate(zip(tasks, repeats)) for _ in range(r) for i in range(len(task))]
        random.Random(seed).shuffle(self.index)  # a positive seed of our own (seeds 1 and -1 collide)

    def num_examples(self):
        return len(self.index)

    def get_example(self, index):
        t, i = self.index[index]
        return self.tasks[t][i]

    def task_of(self, index):
        return self.tasks[self.index[self.start + index * self.step][0]]


class TaskSequence(Task):
    """Tasks one after another, in order."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = tasks
        self.offsets = []
        total = 0
        for task in tasks:
            self.offsets.append(total)
            total += len(task)
        self.total = total

    def num_examples(self):
        return self.total

    def get_example(self, index):
        for task, offset in reversed(list(zip(self.tasks, self.offsets))):
            if index >= offset:
                return task[index - offset]
        raise IndexError(index)


def render_mc(question, letters, choices):
    """The shared multiple-choice prompt: the question, lettered choices, and the instruction."""
    lines = [question.strip(), ""]
    lines += [f"{letter}. {choice}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Answer with the letter of the correct choice ({', '.join(letters)})."]
    return "\n".join(lines)


def mc_conversation(question, choices, gold, letters=None):
    letters = list(letters or LETTERS[:len(choices)])
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": letters[gold]}],
            "letters": letters}


class MultipleChoiceTask(Task):
    eval_type = "categorical"
    letters = list("ABCD")

    def evaluate(self, conversation, completion):
        """completion: the predicted letter (or text starting with it)."""
        gold = conversation["messages"][-1]["content"]
        return int(completion.strip()[:1].upper() == gold)


def use_local():
    return local_data_dir() is not None


def local_subset_rows(path):
    """
    The row count that a deliberate subset of the data (a local folder with a subset.json, such as
    tests/data) declares for one of its files or folders (`path`, inside NANOCHAT_LOCAL_DATA; a .gz
    twin counts as its plain name), or None: a full copy has no subset.json.
    """
    root = local_data_dir()
    subset = os.path.join(root, SUBSET_FILE) if root else None
    if subset is None or not os.path.exists(subset):
        return None
    relpath = os.path.relpath(path, root).replace(os.sep, "/").removesuffix(".gz")
    path = subset
    try:
        with open(path, encoding="utf-8") as f:
            rows = json.load(f)["rows"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: expected {{\"rows\": {{\"<file or folder>\": <count>, ...}}}} ({e!r})") from e
    return rows.get(relpath)


def check_count(rows, expected, what, path):
    """
    A loaded split must have its documented number of rows, or the number that a local subset
    declares for it (path: the file or folder read): either way a truncated or wrong file is an
    error, not a silently smaller evaluation.
    """
    subset = local_subset_rows(path) if use_local() else None
    if subset is not None and subset != expected:
        print(f"note: {what} is a subset of {subset} rows (declared in {SUBSET_FILE}); the full split has {expected}")
        expected = subset
    if expected is not None and len(rows) != expected:
        raise ValueError(f"{what}: {len(rows)} rows in {path}, expected {expected}; the file is incomplete or not the documented one")
    return rows


def _unreachable(url, timeout=10):
    """Why `url` cannot be reached at all, or None: any HTTP answer, an error status too, counts as reached."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, no DNS, timed out
        return getattr(e, "reason", None) or e
    return None


_HUB_REACHED = set()  # endpoints that answered once in this process


def _in_datasets_cache(path):
    """Whether the `datasets` cache holds a copy of hub dataset `path` (its folder is named org___name)."""
    from datasets import config
    return os.path.isdir(os.path.join(config.HF_DATASETS_CACHE, path.replace("/", "___")))


def load_hub(path, name=None, split=None):
    """
    A split of a hub dataset: needs the hub ($HF_ENDPOINT, default huggingface.co), or the `datasets`
    cache with HF_HUB_OFFLINE=1. Unreachable, it is a FetchError at once: one quick look at the hub
    first, because the hub client would retry a refused connection with backoff for about half a minute.
    """
    endpoint = os.environ.get("HF_ENDPOINT", HUB_ENDPOINT).rstrip("/")
    what = f"the HuggingFace dataset {path}" + (f" ({name}, {split})" if name else f" ({split})")
    cache_hint = "HF_HUB_OFFLINE=1 to read the datasets cache"
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and endpoint not in _HUB_REACHED:
        reason = _unreachable(f"{endpoint}/api/datasets/{path}")
        if reason is not None and not _in_datasets_cache(path):  # with a cached copy, `datasets` falls back to it
            raise FetchError(what, endpoint, reason, cache_hint)
        if reason is None:
            _HUB_REACHED.add(endpoint)
    from datasets import load_dataset
    try:
        return load_dataset(path, name, split=split)
    except (ConnectionError, TimeoutError) as e:  # what `datasets` raises when it cannot reach the hub (or cache)
        raise FetchError(what, endpoint, e, cache_hint) from e


__all__ = ["Task", "TaskMixture", "TaskSequence", "MultipleChoiceTask", "render_mc", "mc_conversation",
           "use_local", "local_data_file", "open_text", "check_count", "load_hub", "LETTERS"]
