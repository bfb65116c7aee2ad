"""
The report card: each stage writes its own section to $NANOCHAT_BASE_DIR/report/<section>.md, and
`generate` joins the sections, in pipeline order, into report.md.

    python -m nanochat.report reset      # start a fresh report (speedrun.sh does this first)
    python -m nanochat.report generate   # join the sections into report.md
"""

import argparse
import datetime
import glob
import json
import os
import platform
import re

from nanochat.common import atomic_write, get_base_dir, get_git_commit, get_rank

# pipeline order; sections not listed here come after, alphabetically
SECTION_ORDER = [
    "header", "tokenizer-training", "tokenizer-evaluation", "base-model-training", "base-model-loss",
    "base-model-evaluation", "chat-evaluation-base", "midtraining", "chat-evaluation-mid", "chat-sft", "chat-evaluation-sft",
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

    def read_section(self, name):
        path = os.path.join(self.report_dir, name + ".md")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def summary_table(self):
        """The metrics x stages table, each cell copied from the line `- METRIC: value` of that stage's section."""
        header = "| metric | " + " | ".join(stage for stage, _ in SUMMARY_COLUMNS) + " |"
        lines = [header, "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
        for metric in SUMMARY_METRICS:
            cells = []
            for _, section in SUMMARY_COLUMNS:
                text = self.read_section(section) or ""
                match = re.search(rf"^- {re.escape(metric)}: (.+)$", text, re.M)
                cells.append(match.group(1).strip() if match else "-")
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def generate(self):
        """Join all sections into report/report.md, after a summary table, the code size and the total time."""
        parts = []
        names = self.sections()
        for name in names:
            parts.append(self.read_section(name))
        started = re.search(r"^- started: (\S+)$", self.read_section("header") or "", re.M)
        summary = ["## Summary", "", self.summary_table(), ""]
        summary.append(f"- code: {code_size()}")
        if started:
            elapsed = datetime.datetime.now() - datetime.datetime.fromisoformat(started.group(1))
            summary.append(f"- total wall-clock time: {elapsed.total_seconds() / 3600:.2f} h "
                           f"({elapsed.total_seconds() / 60:.0f} min)")
        figure = loss_curve_svg(os.path.dirname(self.report_dir))
        if figure:
            with atomic_write(os.path.join(self.report_dir, "loss.svg"), "w") as f:
                f.write(figure)
            summary.append("")
            summary.append("![training loss by stage](loss.svg)")
        head, rest = (parts[0], parts[1:]) if names and names[0] == "header" else ("", parts)
        text = head + "\n".join(summary) + "\n\n" + "".join(rest)
        path = os.path.join(self.report_dir, "report.md")
        with atomic_write(path, "w") as f:
            f.write(text)
        return path


# the report card's summary: rows are metrics, columns are stages (and the section each comes from)
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
SUMMARY_COLUMNS = [("BASE", "base-model-evaluation"), ("MID", "chat-evaluation-mid"),
                   ("SFT", "chat-evaluation-sft"), ("RL", "chat-evaluation-rl")]


def code_size():
    """Lines and characters of the project's own source (Python, Rust, shell, HTML)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lines = chars = files = 0
    for folder in ("nanochat", "scripts", "tasks", "rustbpe/src", "bench", "tests"):
        for dirpath, _, filenames in os.walk(os.path.join(root, folder)):
            for name in filenames:
                if name.endswith((".py", ".rs", ".sh", ".html")):
                    with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    files += 1
                    lines += text.count("\n")
                    chars += len(text)
    return f"{files} files, {lines:,} lines, {chars:,} characters"


def loss_curve_svg(base_dir, width=640, height=320):
    """A plain SVG line chart of the training loss of each stage's latest run (metrics.jsonl), or None."""
    series = []
    # RL is left out: its loss is a policy-gradient surrogate around 0, not a cross-entropy (its reward is in its section)
    for stage, color in (("base_checkpoints", "#1f77b4"), ("mid_checkpoints", "#ff7f0e"),
                         ("chatsft_checkpoints", "#2ca02c")):
        files = sorted(glob.glob(os.path.join(base_dir, stage, "*", "metrics.jsonl")), key=os.path.getmtime)
        if not files:
            continue
        points = []
        with open(files[-1], encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                loss = record.get("smooth_loss", record.get("loss"))
                if isinstance(loss, (int, float)) and "step" in record:
                    points.append((record["step"], loss))
        if len(points) >= 2:
            series.append((stage.split("_")[0], color, points))
    if not series:
        return None
    pad = 40
    lo = min(y for _, _, pts in series for _, y in pts)
    hi = max(y for _, _, pts in series for _, y in pts)
    hi = hi if hi > lo else lo + 1
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{pad}" y="16">training loss (each stage on its own step axis); y: {lo:.2f} to {hi:.2f}</text>']
    for i, (name, color, pts) in enumerate(series):
        x0, x1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
        coords = " ".join(f"{pad + (x - x0) / (x1 - x0) * (width - 2 * pad):.1f},"
                          f"{height - pad - (y - lo) / (hi - lo) * (height - 2 * pad):.1f}" for x, y in pts)
        svg.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{coords}"/>')
        svg.append(f'<text x="{width - pad - 60}" y="{30 + 14 * i}" fill="{color}">{name}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


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
