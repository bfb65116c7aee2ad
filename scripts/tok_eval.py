"""
How well does our tokenizer compress? Bytes per token on a few kinds of text (prose, code, math,
Korean, Chinese, German) and on a slice of the train and val shards, next to GPT-2 and GPT-4
(cl100k_base) when tiktoken can load them. More bytes per token = fewer tokens = more text per context.

    python -m scripts.tok_eval
"""

import argparse

import tiktoken

from nanochat.common import print0
from nanochat.report import get_report
from nanochat.tokenizer import get_tokenizer

# Short samples written for this script: each kind stresses a different part of the vocabulary.
SAMPLES = {
    "prose": (
        "The lighthouse keeper had kept a logbook for thirty-one years, and in all that time he had "
        "never once written the word 'lonely'. He wrote about the weather instead: the fog that rolled "
        "in each October, the gulls that nested on the rail, the night the lamp failed and he climbed "
        "the stairs with a kerosene lantern to signal the fishing boats home by hand."
    ),
    "code": (
        "def moving_average(values, window):\n"
        "    \"\"\"Mean of each run of `window` consecutive values.\"\"\"\n"
        "    if window <= 0:\n"
        "        raise ValueError(f\"window must be positive, got {window}\")\n"
        "    total = sum(values[:window])\n"
        "    out = [total / window]\n"
        "    for i in range(window, len(values)):\n"
        "        total += values[i] - values[i - window]\n"
        "        out.append(total / window)\n"
        "    return out\n"
    ),
    "math": (
        "Let f(x) = 3x^2 - 12x + 7. Then f'(x) = 6x - 12, which vanishes at x = 2, and f(2) = 12 - 24 + 7 = -5. "
        "Since f''(x) = 6 > 0, the minimum is -5. Check: 1234 * 56 = 69104 and 69104 / 8 = 8638. "
        "$\\int_0^1 x^3\\,dx = \\frac{1}{4}$ and $\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}$."
    ),
    "korean": (
        "작은 항구 마을에는 매일 아침 빵 냄새가 퍼졌다. 빵집 주인은 해가 뜨기 전에 일어나 반죽을 치대고, "
        "어부들은 배를 타기 전에 따뜻한 빵을 하나씩 사 갔다. 겨울이 오면 바람이 거세졌지만 "
        "사람들은 여전히 가게 앞에 줄을 섰고, 주인은 그 줄을 보는 것이 하루 중 가장 즐거운 일이라고 말했다."
    ),
    "chinese": (
        "山脚下有一座小小的图书馆，馆里只有一位管理员。她每天早上打开窗户，让阳光照在旧书上。"
        "孩子们放学后会来这里写作业，老人们喜欢坐在角落里读报纸。下雨的时候，屋檐下总是挤满了躲雨的人，"
        "她就给大家倒一杯热茶，听他们讲镇上的新鲜事。"
    ),
    "german": (
        "Am Rand der Stadt steht eine alte Mühle, deren Flügel sich seit Jahrzehnten nicht mehr drehen. "
        "Die Kinder aus der Nachbarschaft erzählen sich Geschichten über einen Müller, der angeblich nachts "
        "noch immer Mehl mahlt. Niemand glaubt wirklich daran, aber im Herbst, wenn der Nebel über die "
        "Felder zieht, geht trotzdem keiner gern allein an der Mühle vorbei."
    ),
}


def shard_samples(max_chars):
    """The first `max_chars` characters of the train and val splits, if shards are on disk; else {}."""
    try:
        from nanochat.dataset import parquets_iter_batched
    except ImportError:
        return {}
    samples = {}
    for split in ("train", "val"):
        text = ""
        try:
            for batch in parquets_iter_batched(split=split):
                text += "".join(batch)
                if len(text) >= max_chars:
                    break
        except (FileNotFoundError, ValueError, RuntimeError) as e:
            print0(f"no {split} shard sample: {e}")
            continue
        if text:
            samples[f"{split} shard"] = text[:max_chars]
    return samples


def load_reference_encodings():
    """GPT-2 and GPT-4 encodings; tiktoken downloads them once, so offline they may be missing."""
    encodings, missing = {}, []
    for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
        try:
            encodings[label] = tiktoken.get_encoding(name)
        except Exception as e:  # a network error of whatever kind the HTTP stack raises
            missing.append(f"{name} ({type(e).__name__})")
    if missing:
        print0(f"could not load {', '.join(missing)} — offline? the table shows ours without them")
    return encodings


def main():
    parser = argparse.ArgumentParser(description="Bytes per token of our tokenizer vs GPT-2 / GPT-4.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shard-chars", type=int, default=100_000,
                        help="characters of the train and val shards to include as two extra rows (0 = skip)")
    args = parser.parse_args()
    print0(f"flags: {vars(args)}")

    tokenizer = get_tokenizer()
    texts = dict(SAMPLES)
    if args.shard_chars > 0:
        texts.update(shard_samples(args.shard_chars))
    encoders = {"ours": lambda s: tokenizer.encode(s)}
    for label, enc in load_reference_encodings().items():
        encoders[label] = enc.encode_ordinary

    print0(f"our vocab size: {tokenizer.get_vocab_size()}")
    header = f"{'text':<12} {'bytes':>8}" + "".join(f" {label + ' tok':>10} {label + ' B/tok':>10}" for label in encoders)
    print0(header)
    print0("-" * len(header))
    table = [header, "-" * len(header)]
    summary = {}
    for kind, text in texts.items():
        n_bytes = len(text.encode("utf-8"))
        row = f"{kind:<12} {n_bytes:>8}"
        for label, encode in encoders.items():
            ids = encode(text)
            if label == "ours" and tokenizer.decode(ids) != text:
                raise RuntimeError(f"our tokenizer does not round-trip the {kind} text")
            row += f" {len(ids):>10} {n_bytes / max(len(ids), 1):>10.2f}"
            summary[f"{kind} bytes/token ({label})"] = n_bytes / max(len(ids), 1)
        print0(row)
        table.append(row)
    get_report().log("Tokenizer evaluation", [summary, "```", *table, "```"])


if __name__ == "__main__":
    main()
