"""
The report card: each stage writes its own section to $NANOCHAT_BASE_DIR/report/<section>.md, and
`generate` joins the sections, in pipeline order, into report.md.

    python -m nanochat.report reset      # start a fresh report (speedrun.sh does this first)
    python -m nanochat.report generate   # join the sections into report.md
"""

import argparse
import datetime
import os
import platform
import re

from nanochat.common import atomic_write, get_base_dir, get_rank

# pipeline order; sections not listed here come after, alphabetically
SECTION_ORDER = [
    "header", "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
    "base-model-evaluation", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
    "chat-rl", "chat-evaluation-rl",
]


def slugify(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _format_value(value):
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


class Report:
    def __init__(self, report_dir):
        self.report_dir = report_dir

    def log(self, section, data):
        """
        Write one stage's section. data: a list whose items are dicts (rendered as '- key: value'
        lines) or strings (written as they are). Rewriting a section replaces it (a re-run stage).
        """
        lines = [f"## {section}", f"timestamp: {datetime.datetime.now().isoformat(timespec='seconds')}", ""]
        for item in data:
            if isinstance(item, dict):
                lines += [f"- {key}: {_format_value(value)}" for key, value in item.items()]
            else:
                lines.append(str(item))
        path = os.path.join(self.report_dir, slugify(section) + ".md")
        with atomic_write(path, "w") as f:
            f.write("\n".join(lines) + "\n\n")
        return path

    def reset(self):
        """Remove every section and write a fresh header (date, machine, commit)."""
        from nanochat.common import get_git_commit
        os.makedirs(self.report_dir, exist_ok=True)
        for name in os.listdir(self.report_dir):
            if name.endswith(".md"):
                os.remove(os.path.join(self.report_dir, name))
        header = [
            "# nanochat report card",
            "",
            f"- started: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
            f"- python: {platform.python_version()}",
            f"- git commit: {get_git_commit()}",
        ]
        try:
            import torch
            gpus = torch.cuda.device_count()
            header.append(f"- torch: {torch.__version__}; GPUs: "
                          + (f"{gpus} x {torch.cuda.get_device_name(0)}" if gpus else "none"))
        except Exception:  # report generation must never fail on a probe
            pass
        with atomic_write(os.path.join(self.report_dir, "header.md"), "w") as f:
            f.write("\n".join(header) + "\n\n")

    def sections(self):
        if not os.path.isdir(self.report_dir):
            return []
        names = [n[:-3] for n in os.listdir(self.report_dir) if n.endswith(".md") and n != "report.md"]
        rank = {name: i for i, name in enumerate(SECTION_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(SECTION_ORDER)), n))

    def generate(self):
        """Join all sections into report/report.md."""
        parts = []
        for name in self.sections():
            with open(os.path.join(self.report_dir, name + ".md"), encoding="utf-8") as f:
                parts.append(f.read())
        text = "".join(parts)
        path = os.path.join(self.report_dir, "report.md")
        with atomic_write(path, "w") as f:
            f.write(text)
        return path


class DummyReport:
    """Ranks other than 0 write nothing."""

    def log(self, *args, **kwargs):
        pass

    def reset(self, *args, **kwargs):
        pass


def get_report():
    if get_rank() != 0:
        return DummyReport()
    return Report(os.path.join(get_base_dir(), "report"))


def main():
    parser = argparse.ArgumentParser(description="Reset or generate the report card.")
    parser.add_argument("command", choices=["reset", "generate"])
    args = parser.parse_args()
    report = get_report()
    if args.command == "reset":
        report.reset()
        print(f"report reset in {report.report_dir}")
    else:
        path = report.generate()
        print(f"report written to {path}")


if __name__ == "__main__":
    main()
