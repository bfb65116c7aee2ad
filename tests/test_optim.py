"""Optimizers and schedules: Newton-Schulz and Polar Express, AdamW against torch's, NorMuon and cautious decay against
per-element references, (the schedules: test_schedule.py)."""

import math

import numpy as np
import pytest
import torch

from nanochat.optim import (ORTHOGONALIZERS, AdamW, Muon, _minimax_quintic, normuon_scale, polar_express,
                            polar_express_coefficients, zeropower_via_newtonschulz5)


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (128, 512), (3, 48, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_newton_schulz_singular_values(shape, dtype):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g).to(dtype)
    X = zeropower_via_newtonschulz5(G).float()
    assert X.shape == G.shape
    s = torch.linalg.svdvals(X)
    assert s.min() >= 0.5 and s.max() <= 1.5, (s.min().item(), s.max().item())
    # and it is G's polar factor, not any orthogonal matrix: U V^T of G's SVD
    U, _, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    cos = (X * (U @ Vh)).sum(dim=(-2, -1)) / (X.norm(dim=(-2, -1)) * (U @ Vh).norm(dim=(-2, -1)))
    assert (cos > 0.95).all(), cos


def test_newton_schulz_square_matrices_bulk():
    # Square Gaussian matrices have singular values near 0, which 5 steps cannot lift to 0.5: Muon
    # accepts that by design. The bulk still lands in range.
    G = torch.randn(256, 256, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert s.max() <= 1.5
    assert ((s >= 0.5) & (s <= 1.5)).float().mean() > 0.95


def test_adamw_equals_torch_adamw():
    torch.manual_seed(0)
    shapes = [(64, 32), (7, 5), (100,)]
    ours_params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ours, ref = AdamW(ours_params, **kwargs), torch.optim.AdamW(ref_params, **kwargs)
    for step in range(20):
        for a, b in zip(ours_params, ref_params):
            grad = torch.randn_like(a) * (1 + step)
            a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    for a, b in zip(ours_params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, torch.zeros_like(a))


def test_muon_step_is_orthogonalised_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 64))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, momentum=0.9, nesterov=False)
    p.grad = torch.randn(32, 64)
    opt.step()
    expected = start - 0.1 * zeropower_via_newtonschulz5(p.grad * 0.1)  # buf = (1 - momentum) * grad
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------
# Polar Express, NorMuon, cautious weight decay (issue 21)

def test_minimax_quintic_equioscillates():
    """The Remez result is the minimax quintic: |p - 1| reaches its maximum E at 4 points with alternating signs."""
    for lo, hi in ((1e-3, 1.0), (0.05, 1.02), (0.6, 1.1)):
        a, b, c = _minimax_quintic(lo, hi)
        x = np.linspace(lo, hi, 200_001)
        err = a * x + b * x ** 3 + c * x ** 5 - 1
        E = np.abs(err).max()
        assert abs(err[0] + E) < 1e-6 * max(E, 1) and abs(err[-1] - E) < 1e-6 * max(E, 1)  # -E at lo, +E at hi
        interior = err[1:-1]
        assert abs(interior.max() - E) < 1e-6 and abs(interior.min() + E) < 1e-6
        assert x[1 + interior.argmax()] < x[1 + interior.argmin()]  # max first, then min: the alternation


def test_polar_express_band_is_where_every_singular_value_ends():
    """The composed scalar quintics take every x in [1e-3, 1 + safety] into the stated band, and reach both ends."""
    coefficients, (lo, hi) = polar_express_coefficients(5)
    x = np.concatenate([np.geomspace(1e-3, 1.02, 200_001), [1.0]])
    for a, b, c in coefficients:
        x = a * x + b * x ** 3 + c * x ** 5
    assert x.min() >= lo - 1e-12 and x.max() <= hi + 1e-12
    assert x.min() < lo + 1e-9 and x.max() > hi - 1e-3  # the band is tight, not merely safe


def test_polar_express_equals_a_float64_svd_reference():
    """
    Every singular value s of G goes through the composed scalar quintics, the singular vectors stay G's: the
    fp32 result equals U f(S) V^T computed in float64 from G's SVD, and f(S) lies in the documented band for
    singular values in [lo, 1] after scaling by the Frobenius norm.
    """
    coefficients, (lo, hi) = polar_express_coefficients(5)
    assert 0.85 < lo < 1 < hi < 1.15 and abs(lo + hi - 2) < 1e-12  # the band is symmetric around 1
    g = torch.Generator().manual_seed(0)
    for rows, cols in ((48, 96), (96, 48), (64, 64)):
        k = min(rows, cols)
        U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
        s = torch.logspace(-2, 0, k, dtype=torch.float64)  # well inside [lo, 1] once scaled
        G = U @ torch.diag(s) @ V.T
        x = s / (G.norm() + 1e-7)
        assert x.min() >= 1e-3
        for a, b, c in coefficients:
            x = a * x + b * x ** 3 + c * x ** 5
        assert (x >= lo - 1e-9).all() and (x <= hi + 1e-9).all()
        reference = U @ torch.diag(x) @ V.T
        ours = polar_express(G.float(), dtype=torch.float32).double()
        assert (ours - reference).abs().max() < 2e-4, (ours - reference).abs().max()
        ns = torch.linalg.svdvals(zeropower_via_newtonschulz5(G.float()).double())
        assert torch.linalg.svdvals(ours).min() > ns.min()  # the worst case is better than Newton-Schulz's


def slow_normuon(update, second_moment, beta2, eps=1e-10):
    """NorMuon element by element, in float64 Python."""
    rows, cols = len(update), len(update[0])
    per_row = rows <= cols
    n = rows if per_row else cols
    mean_sq = [sum((update[i][j] if per_row else update[j][i]) ** 2 for j in range(cols if per_row else rows))
               / (cols if per_row else rows) for i in range(n)]
    v = [beta2 * second_moment[i] + (1 - beta2) * mean_sq[i] for i in range(n)]
    scaled = [[update[i][j] / (math.sqrt(v[i if per_row else j]) + eps) for j in range(cols)] for i in range(rows)]
    norm = lambda m: math.sqrt(sum(y * y for r in m for y in r))  # noqa: E731
    ratio = norm(update) / (norm(scaled) + eps)
    return [[y * ratio for y in r] for r in scaled], v


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_normuon_equals_a_per_element_reference(shape):
    torch.manual_seed(0)
    side = (shape[0], 1) if shape[0] <= shape[1] else (1, shape[1])
    moment = torch.rand(side)
    expected_moment = moment.flatten().tolist()
    for _ in range(3):
        update = torch.randn(shape) * torch.linspace(0.1, 3, shape[1])  # columns (and rows) of unequal size
        expected, expected_moment = slow_normuon(update.tolist(), expected_moment, 0.9)
        got = normuon_scale(update, moment, 0.9)
        torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moment.flatten().double(), torch.tensor(expected_moment, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cautious", [True, False])
@pytest.mark.parametrize("orthogonalize, beta2", [("newton_schulz", None), ("polar_express", 0.9)])
def test_muon_step_with_decay_equals_a_per_element_reference(cautious, orthogonalize, beta2):
    """Two Muon steps against the same steps written out element by element from the orthogonalised update."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 16))
    weight = p.detach().double().tolist()
    lr, wd, mu = 0.05, 0.3, 0.9
    opt = Muon([p], lr=lr, momentum=mu, nesterov=True, orthogonalize=orthogonalize, beta2=beta2, weight_decay=wd,
               cautious=cautious)
    buf, moment = torch.zeros(8, 16), torch.zeros(8, 1)
    for _ in range(2):
        grad = torch.randn(8, 16)
        p.grad = grad.clone()
        buf = buf.lerp(grad, 1 - mu)
        g = ORTHOGONALIZERS[orthogonalize](torch.lerp(grad, buf, mu), dtype=torch.float32)
        if beta2 is not None:
            g = normuon_scale(g, moment, beta2)
        g = g.tolist()
        for i in range(8):
            for j in range(16):
                w = weight[i][j]
                decays = not cautious or g[i][j] * w > 0
                weight[i][j] = w - lr * wd * w * decays - lr * g[i][j]  # aspect 8/16: scale 1
        opt.step()
    torch.testing.assert_close(p.detach().double(), torch.tensor(weight, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    if beta2 is not None:
        assert opt.state[p]["second_moment"].shape == (8, 1)  # rows <= cols: per row


MUON_2RANKS = r"""
import sys, torch, torch.distributed as dist
from nanochat.optim import Muon
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
shapes = [(8, 16)] * 3 + [(16, 8)]  # three of one shape: the last chunk is padded
def run(ranks):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = Muon(params, lr=0.05, momentum=0.9, orthogonalize="polar_express", beta2=0.9, weight_decay=0.2)
    for step in range(3):
        for i, p in enumerate(params):  # rank r's gradient; one process averages every rank's itself
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + r)) for r in ranks]
            p.grad = torch.stack(grads).mean(0)
        opt.step()
    return params, opt
params, opt = run([rank])  # this rank's own gradients; the optimizer averages them across ranks
torch.save({"params": [p.detach() for p in params], "state": {i: opt.state[p] for i, p in enumerate(params) if p in opt.state}},
           f"{sys.argv[1]}/rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
"""


def test_muon_new_state_on_two_gloo_ranks_equals_one_process(tmp_path):
    """Polar Express + NorMuon + decay over 2 gloo ranks == one process with the averaged gradients: the same
    weights on both ranks, and each matrix's second moment kept by exactly one rank, equal to the one-process one."""
    import os
    import subprocess
    import sys
    from conftest import REPO_ROOT
    script = tmp_path / "child.py"
    script.write_text(MUON_2RANKS)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", PYTHONPATH=REPO_ROOT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # one process, both ranks' gradients averaged (the same generator seeds as the children)
    shapes = [(8, 16)] * 3 + [(16, 8)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = Muon(params, lr=0.05, momentum=0.9, orthogonalize="polar_express", beta2=0.9, weight_decay=0.2)
    for step in range(3):
        for i, p in enumerate(params):
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + r)) for r in range(2)]
            p.grad = torch.stack(grads).mean(0)
        opt.step()
    for r in ranks:
        for got, want in zip(r["params"], params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    owners = {i: [r for r in range(2) if i in ranks[r]["state"]] for i in range(len(params))}
    assert all(len(o) == 1 for o in owners.values()), owners  # sharded: one owner per matrix
    for i, p in enumerate(params):
        kept = ranks[owners[i][0]]["state"][i]
        torch.testing.assert_close(kept["second_moment"], opt.state[p]["second_moment"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kept["momentum_buffer"], opt.state[p]["momentum_buffer"], rtol=1e-5, atol=1e-7)


def test_muon_resumes_exactly_with_its_new_state(tmp_path):
    """The state dict (momentum and NorMuon's second moments) saved and loaded into a fresh optimizer continues
    bit for bit; a fresh optimizer without it does not (so the check can tell)."""
    def make():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 16)), torch.nn.Parameter(torch.randn(16, 8))]
        return params, Muon(params, lr=0.05, orthogonalize="polar_express", beta2=0.9, weight_decay=0.2)

    def steps(params, opt, seeds):
        for seed in seeds:
            g = torch.Generator().manual_seed(seed)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    params, opt = make()
    steps(params, opt, [1, 2])
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    steps(params, opt, [3, 4])
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert all("second_moment" in s for s in saved["opt"]["state"].values())
    for with_state in (True, False):
        resumed, opt2 = make()
        with torch.no_grad():
            for p, w in zip(resumed, saved["params"]):
                p.copy_(w)
        if with_state:
            opt2.load_state_dict(saved["opt"])
        steps(resumed, opt2, [3, 4])
        same = all(torch.equal(a, b) for a, b in zip(params, resumed))
        assert same == with_state
