"""
The tasks by name, for the scripts that pick them by name: chat_eval's evaluation tasks (with the
chance level of their accuracy, for ChatCORE) and the identity conversations the mid and SFT mixtures
add when the file is there. Scoring them is nanochat/task_eval.py, which never imports tasks/.
"""

import os

from tasks.arc import ARC
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.mmlu import MMLU
from tasks.spellingbee import SpellingBee

IDENTITY_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "identity_conversations.jsonl")


def task_registry():
    """name -> (constructor, chance level of its accuracy)."""
    return {
        "ARC-Easy": (lambda: ARC(subset="ARC-Easy", split="test"), 0.25),
        "ARC-Challenge": (lambda: ARC(subset="ARC-Challenge", split="test"), 0.25),
        "MMLU": (lambda: MMLU(subset="all", split="test"), 0.25),
        "GSM8K": (lambda: GSM8K(subset="main", split="test"), 0.0),
        "HumanEval": (lambda: HumanEval(), 0.0),
        "SpellingBee": (lambda: SpellingBee(size=256, split="test"), 0.0),
    }
