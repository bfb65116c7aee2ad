"""
bench.gpu, the prepared GPU check, on the CPU (--device cpu --tiny): every check runs its real logic in
seconds, so the script cannot rot between GPU loans; and its checks can fail (planted faults).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

import bench.gpu as gpu


def test_every_check_runs_on_the_cpu_and_passes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = {row["check"]: row for row in report["rows"]}
    assert all(row["ok"] for row in rows.values()), [row for row in rows.values() if not row["ok"]]
    for prefix in ("reference: logits", "reference: gradients", "reference: Muon+AdamW step", "reference: bf16 autocast",
                   "compile: recompilations", "compile: compiled vs eager", "d2 train: tokens/s", "d2 train: MFU",
                   "d2 decode batch 1", "d2 decode batch 8", "d2 prefill", "d2 batched decode, 1 request", "d2 batched decode, 8 request",
                   "torchrun x1 base_train (gloo)", "fp8 d2: loss after",
                   "additions: logits", "additions: gradients", "additions: compiled", "additions: cached greedy"):
        assert any(name.startswith(prefix) for name in rows), (prefix, list(rows))
    assert rows["compile: recompilations over steps 2-4"]["value"] == 0
    assert rows["d2 train: tokens/s"]["value"] > 0 and 0 < rows["d2 train: MFU"]["value"] < 1
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "**NO**" not in table  # a header and one line per row


def run_reference(tmp_path):
    code = gpu.main(["--device", "cpu", "--tiny", "--checks", "reference", "--out", str(tmp_path)])
    rows = {row["check"]: row for row in json.loads((tmp_path / "gpu_check.json").read_text())["rows"]}
    return code, rows


def test_a_planted_tolerance_fails_the_check(tmp_path, monkeypatch):
    code, rows = run_reference(tmp_path)
    assert code == 0 and all(row["ok"] for row in rows.values())
    monkeypatch.setitem(gpu.TOL, "bf16_loss_abs", 1e-9)  # bf16 cannot match fp32 this closely
    code, rows = run_reference(tmp_path)
    assert code == 1 and not rows["reference: bf16 autocast loss vs fp32 (abs)"]["ok"]
    assert rows["reference: logits (fp32)"]["ok"]  # the other rows are unaffected


def test_a_bf16_cast_on_the_reference_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "make_reference", lambda model: gpu.copy.deepcopy(model).to("cpu", torch.bfloat16))
    code, rows = run_reference(tmp_path)
    assert code == 1
    for name in ("reference: logits (fp32)", "reference: gradients (fp32, worst tensor)"):
        assert not rows[name]["ok"], rows[name]


def test_bad_flags_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit):
        gpu.main(["--checks", "reference,nope", "--out", str(tmp_path)])
