"""Optimizers and schedules: Newton-Schulz, AdamW against torch's, the LR and momentum schedules."""

import pytest
import torch

from nanochat.optim import AdamW, Muon, lr_multiplier, muon_momentum, zeropower_via_newtonschulz5


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


def test_lr_multiplier_schedule():
    n = 1000
    # no warmup: flat at 1 until the warmdown, then linear to final_lr_frac
    assert lr_multiplier(0, n, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier(500, n, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier(800, n, 0.0, 0.2, 0.0) == 1.0
    assert lr_multiplier(900, n, 0.0, 0.2, 0.0) == pytest.approx(0.5)
    assert lr_multiplier(1000, n, 0.0, 0.2, 0.0) == pytest.approx(0.0)
    assert lr_multiplier(1000, n, 0.0, 0.2, 0.1) == pytest.approx(0.1)
    # warmup ramps up, never down
    ramp = [lr_multiplier(s, n, 0.1, 0.2) for s in range(100)]
    assert ramp == sorted(ramp) and ramp[0] < 0.05 and ramp[-1] == 1.0
    # the warmdown decays monotonically
    down = [lr_multiplier(s, n, 0.1, 0.2) for s in range(800, 1001)]
    assert down == sorted(down, reverse=True)


def test_muon_momentum_schedule():
    assert muon_momentum(0) == pytest.approx(0.85)
    assert muon_momentum(150) == pytest.approx(0.90)
    assert muon_momentum(300) == pytest.approx(0.95)
    assert muon_momentum(10_000) == pytest.approx(0.95)
