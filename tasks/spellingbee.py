"""
Spelling and letter counting, generated from an English word list (dwyl/english-words words_alpha).

SpellingBee: "How many 'r' are in 'strawberry'?" in varied phrasings; the assistant spells the word
out, checks with the calculator tool ('strawberry'.count('r') -> 3) and states the count.
SimpleSpelling: "Spell the word 'cat'" -> "c-a-t". Example i of a split is a pure function of
(split, i), so runs are reproducible; train and test use disjoint words.
"""

import http.client
import io
import os
import random
import re
import urllib.error
import urllib.request
import zipfile

from nanochat.common import FetchError, atomic_write, get_base_dir, local_data_file
from tasks.common import use_local
from tasks.common import Task

WORDS_URL = os.environ.get("NANOCHAT_WORDS_URL", "https://raw.githubusercontent.com/dwyl/english-words/master/words_alpha.txt")
SPLIT_SEEDS = {"train": 101, "test": 202}  # distinct positive seeds (1 and -1 would collide)
QUESTIONS = [
    "How many {letter} are in the word {word}?",
    "How many times does the letter {letter} appear in {word}?",
    "Count the {letter}'s in {word}.",
    "In the word {word}, how many {letter} are there?",
    "how many {letter} in {word}",
    "What is the number of {letter} letters in \"{word}\"?",
    "Can you tell me how many {letter}s the word {word} contains?",
    "{word}: how many {letter}?",
]


def load_words():
    """The word list: NANOCHAT_LOCAL_DATA/wordlist/words_alpha.zip, else downloaded once (http(s) or file://)."""
    if use_local():
        with zipfile.ZipFile(local_data_file("wordlist", "words_alpha.zip")) as z:
            text = z.read("words_alpha.txt").decode("utf-8")
    else:
        path = os.path.join(get_base_dir(), "words_alpha.txt")
        if not os.path.exists(path):
            try:
                with urllib.request.urlopen(WORDS_URL, timeout=60) as r:
                    data = r.read()
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                raise FetchError("the SpellingBee word list", WORDS_URL, getattr(e, "reason", None) or e,
                                 "NANOCHAT_WORDS_URL to a mirror of words_alpha.txt, http(s):// or file://") from e
            with atomic_write(path, "wb") as f:
                f.write(data)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    words = [w.strip() for w in text.splitlines() if w.strip().isalpha()]
    if len(words) < 1000:
        raise ValueError(f"the word list has only {len(words)} words")
    return words


class _WordTask(Task):
    eval_type = "generative"
    _words = None

    def __init__(self, size=1000, split="train", **kwargs):
        super().__init__(**kwargs)
        if split not in SPLIT_SEEDS:
            raise ValueError(f"split must be train or test, got {split!r}")
        self.size, self.split = size, split
        if _WordTask._words is None:
            _WordTask._words = load_words()
        words = [w for w in _WordTask._words if 3 <= len(w) <= 14]
        self.words = words[::20] if split == "test" else [w for i, w in enumerate(words) if i % 20]

    def num_examples(self):
        return self.size

    def rng(self, index):
        return random.Random(SPLIT_SEEDS[self.split] * 1_000_003 + index)


class SpellingBee(_WordTask):
    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly letters of the word, sometimes one it lacks (the answer 0 must be learned too)
        letter = rng.choice(word) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        quote = rng.choice(["'{}'", '"{}"', "{}"])
        question = rng.choice(QUESTIONS).format(letter=quote.format(letter), word=quote.format(word))
        if rng.random() < 0.3:
            question = question.upper() if rng.random() < 0.2 else question.capitalize()
        count = word.count(letter)
        spelled = ",".join(word)
        parts = [
            {"type": "text", "text": f"We are counting the letter '{letter}' in '{word}'. Spelled out: {spelled}. "
                                     f"Let me count with the calculator: "},
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nThere {'is' if count == 1 else 'are'} {count} '{letter}' in '{word}'.\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "answer": count}

    def evaluate(self, conversation, completion):
        m = re.findall(r"####\s*(\d+)", completion) or re.findall(r"\d+", completion)
        return int(bool(m) and int(m[-1]) == conversation["answer"])


class SimpleSpelling(_WordTask):
    def get_example(self, index):
        rng = self.rng(index)
        word = rng.choice(self.words)
        question = rng.choice(["Spell the word {}.", "How do you spell {}?", "spell {}", "Spell out '{}' letter by letter."]).format(word)
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "-".join(word)}],
                "answer": "-".join(word)}

    def evaluate(self, conversation, completion):
        return int(completion.strip().rstrip(".").lower() == conversation["answer"])
