"""
Tasks on real files: counts, well-formed conversations, conversions, evaluation. The suite's own
copy (tests/data, a declared subset) by default; the full copy (large_data) for the full counts.
"""

import gzip
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TEST_DATA, shakespeare
from nanochat.calculator import use_calculator
from nanochat.tokenizer import RustBPETokenizer


@pytest.fixture(autouse=True)
def local_data(monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", TEST_DATA)


@pytest.fixture(scope="module")
def tokenizer():
    text = shakespeare(100_000)
    return RustBPETokenizer.train_from_iterator(iter([text[i:i + 1000] for i in range(0, len(text), 1000)]), 400)


def all_tasks():
    """name -> (constructor, rows in the full copy, rows in tests/data); None: not a fixed number."""
    from tasks.arc import ARC
    from tasks.gsm8k import GSM8K
    from tasks.humaneval import HumanEval
    from tasks.mmlu import MMLU
    from tasks.smoltalk import HHRLHF, SmolTalk
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    return {
        ("ARC-Easy", "test"): (lambda: ARC("ARC-Easy", "test"), 2376, 60),
        ("ARC-Easy", "train"): (lambda: ARC("ARC-Easy", "train"), 2251, 60),
        ("ARC-Challenge", "test"): (lambda: ARC("ARC-Challenge", "test"), 1170, 60),
        ("MMLU", "test"): (lambda: MMLU("all", "test"), 14042, 100),
        ("MMLU", "validation"): (lambda: MMLU("all", "validation"), 1531, 66),
        ("MMLU", "auxiliary_train"): (lambda: MMLU("auxiliary_train", "train"), 1218, 120),
        ("GSM8K", "test"): (lambda: GSM8K("main", "test"), 1319, 300),
        ("GSM8K", "train"): (lambda: GSM8K("main", "train"), 7473, 200),
        ("HumanEval", "test"): (lambda: HumanEval(), 164, 164),
        ("SmolTalk", "train"): (lambda: SmolTalk("train"), None, None),
        ("SmolTalk", "test"): (lambda: SmolTalk("test"), None, None),
        ("HHRLHF", "test"): (lambda: HHRLHF(), None, 60),
        ("SpellingBee", "train"): (lambda: SpellingBee(300, "train"), 300, 300),
        ("SimpleSpelling", "test"): (lambda: SimpleSpelling(100, "test"), 100, 100),
    }


def check_conversations(task, tokenizer):
    """Up to 40 conversations spread over the task: roles alternate, contents are real, the mask is right."""
    for i in list(range(0, len(task), max(1, len(task) // 40)))[:40]:
        conversation = task[i]
        messages = conversation["messages"]
        assert len(messages) >= 2 and messages[-1]["role"] == "assistant"
        for j, m in enumerate(messages):
            assert m["role"] == ("user" if j % 2 == 0 else "assistant")
            assert m["content"] if isinstance(m["content"], str) else all(p["text"] for p in m["content"] if p["type"] != "text")
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=100_000)
        # the mask marks assistant tokens only: user text never, the final <|assistant_end|> always
        assert mask[-1] == 1 and ids[-1] == tokenizer.encode_special("<|assistant_end|>")
        user_start, user_end = tokenizer.encode_special("<|user_start|>"), tokenizer.encode_special("<|user_end|>")
        inside_user = False
        for token, m in zip(ids, mask):
            if token == user_start:
                inside_user = True
            if inside_user:
                assert m == 0
            if token == user_end:
                inside_user = False


@pytest.mark.parametrize("key", list(all_tasks().keys()), ids=lambda k: "-".join(k))
def test_counts_and_well_formed_conversations(key, tokenizer):
    make, _, expected = all_tasks()[key]
    task = make()
    if expected is not None:
        assert len(task) == expected
    # the offline SmolTalk test split is every 10th of tests/data's 128 SGD dialogues
    assert len(task) >= (10 if key == ("SmolTalk", "test") else 50)
    check_conversations(task, tokenizer)


def test_full_copy_counts_and_well_formed_conversations(tokenizer, large_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", large_data)
    for key, (make, expected, _) in all_tasks().items():
        task = make()
        if expected is not None:
            assert len(task) == expected, key
        assert len(task) > 50, key
        check_conversations(task, tokenizer)


def test_a_truncated_file_fails_its_count_even_in_a_subset(tmp_path, monkeypatch):
    """subset.json declares the rows of each file: one row lost is still an error naming the file."""
    from tasks.gsm8k import GSM8K
    copy = tmp_path / "data"
    shutil.copytree(TEST_DATA, copy, ignore=shutil.ignore_patterns("pretrain", "core"))
    rows = gzip.decompress((copy / "gsm8k" / "test.jsonl.gz").read_bytes()).splitlines(keepends=True)
    (copy / "gsm8k" / "test.jsonl.gz").write_bytes(gzip.compress(b"".join(rows[:-1])))
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(copy))
    with pytest.raises(ValueError, match=r"GSM8K test: 299 rows in .*gsm8k/test\.jsonl\.gz, expected 300"):
        GSM8K("main", "test")
    assert len(GSM8K("main", "train")) == 200
    (copy / "subset.json").unlink()  # without the declaration, the full split's count is expected
    with pytest.raises(ValueError, match="expected 7473"):
        GSM8K("main", "train")
    # the plain file is read when both exist
    (copy / "gsm8k" / "train.jsonl").write_bytes(gzip.decompress((copy / "gsm8k" / "train.jsonl.gz").read_bytes()))
    (copy / "gsm8k" / "train.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"200 rows in .*gsm8k/train\.jsonl, expected 7473"):
        GSM8K("main", "train")


def gsm8k_round_trips():
    from tasks.gsm8k import GSM8K, answer_to_parts, parts_to_answer
    n = 0
    for split in ("train", "test"):
        task = GSM8K("main", split)
        for row in task.rows:
            parts = answer_to_parts(row["answer"])
            assert parts_to_answer(parts) == row["answer"]
            assert "<<" not in "".join(p["text"] for p in parts)
            assert sum(p["type"] == "python" for p in parts) == row["answer"].count("<<")
            n += 1
    return n


def test_gsm8k_tool_call_conversion_round_trips():
    from tasks.gsm8k import answer_to_parts, extract_answer
    assert gsm8k_round_trips() == 500
    example = answer_to_parts("She sold 48/2 = <<48/2=24>>24 clips.\n#### 24")
    assert example == [{"type": "text", "text": "She sold 48/2 = "}, {"type": "python", "text": "48/2"},
                       {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips.\n#### 24"}]
    assert extract_answer("so the total is\n#### 1,234.") == "1234"
    assert extract_answer("no marker here") is None


def test_gsm8k_full_copy_round_trips(large_data, monkeypatch):
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", large_data)
    assert gsm8k_round_trips() == 8792


def test_gsm8k_calculator_reproduces_most_annotations():
    # the real calculator agrees with the dataset's own annotated results (GSM8K's arithmetic)
    from tasks.gsm8k import GSM8K
    agree = total = 0
    for row in GSM8K("main", "test").rows[:300]:
        for expr, result in re.findall(r"<<([^<>]*)=([^<>]*)>>", row["answer"]):
            total += 1
            try:
                agree += abs(float(use_calculator(expr)) - float(result.replace(",", ""))) < 1e-2 * max(1, abs(float(result.replace(",", ""))))
            except ValueError:
                pass
    assert agree / total > 0.9, (agree, total)


def test_gsm8k_evaluate():
    from tasks.gsm8k import GSM8K
    task = GSM8K("main", "test")
    conversation = task[0]
    assert task.evaluate(conversation, "She makes 9 * 2 = 18 dollars.\n#### 18")
    assert not task.evaluate(conversation, "#### 19")
    assert not task.evaluate(conversation, "18")  # no final-answer marker


def test_multiple_choice_rendering_and_evaluation():
    from tasks.arc import ARC
    task = ARC("ARC-Easy", "test")
    c = task[0]
    user = c["messages"][0]["content"]
    assert "\nA. " in user and "\nB. " in user and "(A, B, C, D)" in user
    gold = c["messages"][1]["content"]
    assert gold in c["letters"]
    assert task.evaluate(c, gold) and not task.evaluate(c, next(l for l in c["letters"] if l != gold))
    assert task.eval_type == "categorical"


def test_loaders_put_the_gold_answer_on_the_right_choice():
    """Each multiple-choice conversation, checked against its raw row read here without the loader:
    the gold letter names the choice the row says is right (ARC's answerKey; MMLU's answer letter in
    the headerless layout, its 0-3 index in the headered one)."""
    import csv
    import io
    import json
    from conftest import read_text
    from tasks.arc import ARC
    from tasks.mmlu import MMLU

    def gold_text(conversation):
        letter = conversation["messages"][-1]["content"]
        user = conversation["messages"][0]["content"]
        return re.search(rf"^{letter}\. (.*)$", user, re.M).group(1)

    for subset in ("ARC-Easy", "ARC-Challenge"):
        raw = [json.loads(line) for line in read_text("arc", subset, "test.jsonl").splitlines()]
        task = ARC(subset, "test")
        for i, row in enumerate(raw):
            right = next(c["text"] for c in row["question"]["choices"] if c["label"] == row["answerKey"])
            assert gold_text(task[i]) == right.strip(), (subset, i)
    expected = []
    for name in sorted(os.listdir(os.path.join(TEST_DATA, "mmlu", "test"))):
        for row in csv.reader(io.StringIO(read_text("mmlu", "test", name), newline="")):
            expected.append((row[0], row[1 + "ABCD".index(row[5].strip())]))
    headered = sorted(os.listdir(os.path.join(TEST_DATA, "mmlu", "test_5_subjects_haechan")))
    assert headered, "tests/data must hold the headered MMLU layout too"
    for name in headered:
        for row in csv.DictReader(io.StringIO(read_text("mmlu", "test_5_subjects_haechan", name), newline="")):
            expected.append((row["question"], row[f"choice{int(row['answer'])}"]))
    task = MMLU("all", "test")
    assert len(task) == len(expected)
    for i, (question, right) in enumerate(expected):
        assert task[i]["messages"][0]["content"].startswith(question.strip()) and gold_text(task[i]) == right.strip(), i


def test_mixture_sequence_and_slicing():
    from tasks.common import TaskMixture, TaskSequence
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    a, b = SpellingBee(30, "train"), SimpleSpelling(20, "train")
    mix = TaskMixture([a, b], repeats=[2, 1])
    assert len(mix) == 80
    seen = [str(mix[i]) for i in range(len(mix))]
    expected = [str(a[i]) for i in range(30)] * 2 + [str(b[i]) for i in range(20)]
    assert sorted(seen) == sorted(expected)  # nothing lost, nothing extra
    assert seen == [str(TaskMixture([a, b], repeats=[2, 1])[i]) for i in range(80)]  # deterministic
    assert seen[:30] != [str(a[i]) for i in range(30)]  # shuffled
    seq = TaskSequence([a, b])
    assert len(seq) == 50 and seq[30] == b[0] and seq[29] == a[29]
    view = a[5:20:3]
    assert len(view) == 5 and view[1] == a[8] and view[-1] == a[17]
    assert SpellingBee(30, "train", start=10, stop=20)[0] == a[10]


def test_spelling_answers_are_correct():
    from tasks.spellingbee import SimpleSpelling, SpellingBee
    task = SpellingBee(200, "test")
    for i in range(len(task)):
        c = task[i]
        parts = c["messages"][1]["content"]
        python = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        word, letter = re.fullmatch(r"'(\w+)'\.count\('(\w)'\)", python).groups()
        assert output == use_calculator(python) == str(word.count(letter)) == str(c["answer"])
        final = "".join(p["text"] for p in parts if p["type"] == "text")
        assert task.evaluate(c, final)
    assert SpellingBee(5, "train")[3] == SpellingBee(5, "train")[3]
    test_words = {SimpleSpelling(300, "test")[i]["answer"] for i in range(300)}
    train_words = {SimpleSpelling(300, "train")[i]["answer"] for i in range(300)}
    assert not test_words & train_words  # disjoint word lists
    s = SimpleSpelling(10, "test")[0]
    assert s["messages"][1]["content"].replace("-", "") in s["messages"][0]["content"]


def test_missing_local_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "gsm8k").mkdir()
    monkeypatch.setenv("NANOCHAT_LOCAL_DATA", str(tmp_path))
    from tasks.gsm8k import GSM8K
    with pytest.raises(FileNotFoundError, match=r"gsm8k/test\.jsonl"):
        GSM8K("main", "test")


def test_humaneval_in_the_sandbox():
    from tasks.humaneval import HumanEval
    task = HumanEval(timeout=10)
    conversations = [task[i] for i in range(len(task))]
    with ThreadPoolExecutor(2) as pool:
        canonical = list(pool.map(lambda c: task.evaluate(c, c["messages"][1]["content"]), conversations))
    assert sum(canonical) == 164
    def none_answer(c):
        header = c["prompt"].rstrip()
        return task.evaluate(c, f"```python\n{header}\n    return None\n```")
    with ThreadPoolExecutor(2) as pool:
        nones = list(pool.map(none_answer, conversations))
    assert sum(nones) == 0
    # exiting before the tests run is not a pass
    header = conversations[0]["prompt"]
    assert not task.evaluate(conversations[0], f"```python\nimport sys\nsys.exit(0)\n{header}    pass\n```")
    slow = HumanEval(timeout=2)
    import time
    t0 = time.time()
    assert not slow.evaluate(conversations[0], f"```python\n{conversations[0]['prompt']}    while True:\n        pass\n```")
    assert time.time() - t0 < 20
