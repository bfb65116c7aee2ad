"""The report card: sections in pipeline order, and a summary table whose every cell is its stage's own value."""

import json
import os
import re

from nanochat.report import SUMMARY_COLUMNS, SUMMARY_METRICS, Report, get_report


def table_cells(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in SUMMARY_METRICS:
            rows[cells[0]] = dict(zip([stage for stage, _ in SUMMARY_COLUMNS], cells[1:]))
    return rows


def test_summary_table_cells_equal_the_stage_sections(base_dir):
    report = get_report()
    report.reset()
    report.log("Base model training", [{"depth": 4, "min val bpb": 1.2345}])
    report.log("Base model evaluation", [{"CORE": 0.1234, "arc_easy": 0.5}])
    values = {}
    for k, stage in enumerate(("mid", "sft")):
        values[stage] = {"ARC-Easy": 0.31 + k, "ARC-Challenge": 0.27 + k, "MMLU": 0.26 + k, "GSM8K": 0.02 + k,
                         "HumanEval": 0.01 + k, "ChatCORE": 0.05 + k}
        report.log(f"Chat evaluation {stage}", [{"source": stage}, values[stage]])
    report.log("Chat evaluation rl", [{"GSM8K": 0.0789}])
    # a metric name inside another key must not be picked up ("GSM8K" vs "GSM8K pass@8")
    report.log("Chat RL", [{"GSM8K pass@8": 0.9}])
    path = report.generate()
    text = open(path, encoding="utf-8").read()
    cells = table_cells(text)
    assert cells["CORE"] == {"BASE": "0.1234", "MID": "-", "SFT": "-", "RL": "-"}
    for k, stage in enumerate(("mid", "sft")):
        column = stage.upper()
        for metric, value in values[stage].items():
            section = open(os.path.join(base_dir, "report", f"chat-evaluation-{stage}.md"), encoding="utf-8").read()
            in_section = re.search(rf"^- {metric}: (.+)$", section, re.M).group(1)
            assert cells[metric][column] == in_section == f"{value:.4f}"
    assert cells["GSM8K"]["RL"] == "0.0789" and cells["ARC-Easy"]["RL"] == "-"
    # sections appear in pipeline order, after the header and the summary
    order = [text.index(h) for h in ("# nanochat report card", "## Summary", "## Base model training",
                                     "## Base model evaluation", "## Chat evaluation mid", "## Chat evaluation sft",
                                     "## Chat evaluation rl")]
    assert order == sorted(order)
    assert "code:" in text and "total wall-clock time" in text


def test_loss_figure_from_metrics(base_dir):
    folder = base_dir / "base_checkpoints" / "d4"
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            f.write(json.dumps({"step": step, "loss": 10 - step * 0.5, "smooth_loss": 10 - step * 0.4}) + "\n")
        f.write(json.dumps({"step": 10, "val_bpb": 2.0}) + "\n")
    report = Report(str(base_dir / "report"))
    report.reset()
    text = open(report.generate(), encoding="utf-8").read()
    assert "![training loss by stage](loss.svg)" in text
    svg = open(base_dir / "report" / "loss.svg", encoding="utf-8").read()
    assert svg.startswith("<svg") and svg.count("<polyline") == 1 and "base" in svg


def test_reset_clears_old_sections(base_dir):
    report = get_report()
    report.log("Chat evaluation sft", [{"GSM8K": 0.5}])
    report.reset()
    assert report.sections() == ["header"]
