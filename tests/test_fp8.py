"""
nanochat/fp8.py on the CPU (allow_cpu: the same torch._scaled_mm, slowly) against a float64 emulation
written here from the formats' definitions: a float8 number is a value rounded to nearest-even on a grid
with `mantissa_bits` bits per binade, uniform spacing below the smallest normal, saturated at the
format's max. Every _scaled_mm call is also checked against the op's CUDA rules (the CPU op accepts
layouts and shapes that a GPU refuses), and a tiny GPT trains with fp8 close to its fp32 run.
"""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import nanochat.fp8 as fp8
from nanochat.fp8 import Float8Linear, enable_fp8, fp8_unsupported_reason, maybe_enable_fp8
from nanochat.gpt import GPT, GPTConfig

# (mantissa bits, exponent of the smallest normal, largest finite value): OCP 8-bit floating point spec
E4M3 = (3, -6, 448.0)
E5M2 = (2, -14, 57344.0)
BLOCK_LINEARS = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def round_to_grid(v, fmt):
    """v (float64) rounded to nearest-even on the float8 grid of fmt, saturated at its max."""
    mantissa_bits, min_exp, fmax = fmt
    _, e = torch.frexp(v)  # |v| = m * 2^e with 0.5 <= m < 1: v lies in the binade [2^(e-1), 2^e)
    spacing = torch.pow(2.0, (torch.clamp(e - 1, min=min_exp) - mantissa_bits).double())
    return (torch.round(v / spacing) * spacing).clamp(-fmax, fmax)  # torch.round: half to even


def dequantised(t, fmt):
    """What t becomes after tensorwise scaling (amax -> max, scale in fp32), rounding and unscaling, in float64."""
    t32 = t.detach().float()
    amax = t32.abs().max()
    if amax == 0:
        return torch.zeros_like(t32, dtype=torch.float64)
    scale = torch.tensor(fmt[2], dtype=torch.float32) / amax
    return round_to_grid((t32 * scale).double(), fmt) / scale.double()


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def cuda_rules(monkeypatch):
    """Every torch._scaled_mm call must be one a GPU would accept; the calls are recorded."""
    real, calls = fp8.scaled_mm, []

    def checked(a, b, scale_a, scale_b, out_dtype=None, **kwargs):
        assert a.dim() == 2 and b.dim() == 2 and a.size(1) == b.size(0)
        assert a.stride(1) == 1 and a.stride(0) > 1, f"left operand must be row-major, strides {a.stride()}"
        assert b.stride(0) == 1 and b.stride(1) > 1, f"right operand must be column-major, strides {b.stride()}"
        assert a.size(1) % 16 == 0 and b.size(0) % 16 == 0 and b.size(1) % 16 == 0, (a.shape, b.shape)
        assert {a.dtype, b.dtype} <= {torch.float8_e4m3fn, torch.float8_e5m2}
        assert not (a.dtype == b.dtype == torch.float8_e5m2), "e5m2 x e5m2 has no CUDA kernel"
        for s in (scale_a, scale_b):
            assert s.dtype == torch.float32 and s.numel() == 1, "tensorwise: one fp32 scale per operand"
        assert out_dtype in (torch.float32, torch.bfloat16, torch.float16)
        calls.append((a.dtype, b.dtype, tuple(a.shape), tuple(b.shape), out_dtype))
        return real(a, b, scale_a, scale_b, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(fp8, "scaled_mm", checked)
    return calls


def random_linear(n_in, n_out, seed=0, bias=False):
    torch.manual_seed(seed)
    linear = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0, 0.3)
    return linear


def test_the_emulated_grid_is_torchs_float8():
    # the reference's rounding, checked once against torch's own casts (normals, subnormals, ties). Only
    # in range: what a cast does past the max differs by backend (fp8.to_fp8 clamps before casting)
    v = torch.cat([torch.randn(4000, dtype=torch.float64) * 10.0 ** torch.randint(-6, 4, (4000,)),
                   torch.tensor([0.0, 448.0, 449.0, -460.0, 2.0 ** -9, 1.5 * 2.0 ** -9, 2.0 ** -10, 1.0625, 1.1875])])
    v = v.float().double()  # representable in fp32, as every scaled tensor is
    e4 = v[v.abs() < 464]  # halfway to 480, the next e4m3 step (which e4m3fn spends on NaN)
    torch.testing.assert_close(round_to_grid(e4, E4M3), e4.float().to(torch.float8_e4m3fn).double(), rtol=0, atol=0)
    e5 = v[v.abs() < 57344]
    torch.testing.assert_close(round_to_grid(e5, E5M2), e5.float().to(torch.float8_e5m2).double(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,fmt", [(torch.float8_e4m3fn, E4M3), (torch.float8_e5m2, E5M2)])
def test_to_fp8_maps_amax_to_the_format_max(dtype, fmt):
    torch.manual_seed(0)
    t = torch.randn(64, 48) * 3e-3
    q, inverse = fp8.to_fp8(t, dtype)
    assert q.dtype == dtype and inverse.dtype == torch.float32 and inverse.numel() == 1
    assert q.float().abs().max().item() == fmt[2]  # the largest magnitude lands on the max
    scale = torch.tensor(fmt[2], dtype=torch.float32) / t.abs().max()
    torch.testing.assert_close(q.double(), round_to_grid((t * scale).double(), fmt), rtol=0, atol=0)
    torch.testing.assert_close(q.double() * inverse.double(), dequantised(t, fmt), rtol=1e-6, atol=0)


def test_forward_is_the_dequantised_matmul_and_close_to_fp32(cuda_rules):
    linear = random_linear(64, 48)
    f8 = Float8Linear.from_linear(linear)
    x = torch.randn(2, 16, 64)
    y = f8(x)
    assert y.shape == (2, 16, 48) and y.dtype == torch.float32 and len(cuda_rules) == 1
    emulated = dequantised(x, E4M3) @ dequantised(linear.weight, E4M3).T
    assert rel(y, emulated) < 1e-6  # the same numbers up to fp32 accumulation and scale rounding
    # and against the fp32 matmul: e4m3 rounds each operand by up to 2^-4 relative (3 mantissa bits);
    # over a 64-term dot product the errors average to a few percent, and they are not zero
    error = rel(y, linear(x))
    assert 0.005 < error < 0.08, error


def test_backward_grads_are_the_dequantised_matmuls(cuda_rules):
    linear = random_linear(64, 48, seed=1)
    f8 = Float8Linear.from_linear(linear)
    x = torch.randn(32, 64, requires_grad=True)
    grad_y = torch.randn(32, 48) * 1e-3
    f8(x).backward(grad_y)
    assert [c[:2] for c in cuda_rules[1:]] == [(torch.float8_e5m2, torch.float8_e4m3fn)] * 2  # both grads in fp8
    g, w, xq = dequantised(grad_y, E5M2), dequantised(linear.weight, E4M3), dequantised(x, E4M3)
    assert rel(x.grad, g @ w) < 1e-6
    assert rel(linear.weight.grad, g.T @ xq) < 1e-6
    assert x.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    # close to the fp32 gradients: e5m2 keeps 2 mantissa bits, so up to 2^-3 relative per element
    x_ref = x.detach().clone().requires_grad_()
    w_ref = linear.weight.detach().clone().requires_grad_()
    F.linear(x_ref, w_ref).backward(grad_y)
    assert 0.005 < rel(x.grad, x_ref.grad) < 0.12 and 0.005 < rel(linear.weight.grad, w_ref.grad) < 0.12


def test_an_all_zero_tensor_gives_zeros_not_nan(cuda_rules):
    f8 = Float8Linear.from_linear(random_linear(32, 16))
    x = torch.zeros(16, 32, requires_grad=True)
    y = f8(x)
    assert torch.equal(y, torch.zeros(16, 16))
    y.sum().backward()  # grad_y is all ones, x all zeros: grad_W must be exactly 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    assert torch.equal(f8.weight.grad, torch.zeros(16, 32))
    f8.weight.grad = None
    x2 = torch.randn(16, 32, requires_grad=True)
    (f8(x2) * 0).sum().backward()  # grad_y all zeros
    assert torch.equal(x2.grad, torch.zeros(16, 32)) and torch.equal(f8.weight.grad, torch.zeros(16, 32))


def test_under_autocast_the_output_is_bf16_and_grads_keep_their_dtypes(cuda_rules):
    linear = random_linear(64, 32, seed=2)
    f8 = Float8Linear.from_linear(linear)
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = f8(x)
    assert y.dtype == torch.bfloat16 and cuda_rules[0][-1] == torch.bfloat16
    assert rel(y.float(), dequantised(x, E4M3) @ dequantised(linear.weight, E4M3).T) < 1e-2  # bf16 output rounding
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32  # fp32 master weight


def test_rows_not_a_multiple_of_16_take_the_plain_linear(cuda_rules):
    linear = random_linear(32, 16, seed=3, bias=True)
    f8 = Float8Linear.from_linear(linear)
    x = torch.randn(1, 3, 32)  # e.g. a decode step: a GPU could not run grad_W = grad_y^T @ x in fp8
    torch.testing.assert_close(f8(x), linear(x), rtol=0, atol=0)
    assert cuda_rules == []
    x = torch.randn(16, 32)
    assert rel(f8(x), linear(x)) < 0.08 and len(cuda_rules) == 1  # 16 rows: fp8, the bias added too


def random_gpt(seed=0, **overrides):
    # small: torch's CPU _scaled_mm is a plain loop (~0.04 GFLOP/s); head_dim 16 keeps every width a multiple of 16
    cfg = dict(sequence_len=16, vocab_size=200, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would hide broken gradients
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def test_enable_fp8_swaps_exactly_the_block_linears_and_keeps_the_parameters():
    model = random_gpt()
    plain = copy.deepcopy(model)
    params = list(model.named_parameters())
    keys = list(model.state_dict())
    lm_head, wte = model.lm_head, model.transformer.wte
    swapped = enable_fp8(model, allow_cpu=True)
    assert sorted(swapped) == sorted(f"transformer.h.{i}.{name}" for i in range(2) for name in BLOCK_LINEARS)
    assert {name for name, m in model.named_modules() if isinstance(m, Float8Linear)} == set(swapped)
    assert model.lm_head is lm_head and type(lm_head) is nn.Linear and model.transformer.wte is wte
    after = list(model.named_parameters())
    assert [n for n, _ in after] == [n for n, _ in params] and all(p is q for (_, p), (_, q) in zip(after, params))
    assert list(model.state_dict()) == keys
    assert enable_fp8(model, allow_cpu=True) == []  # twice is a no-op
    # the checkpoint is the ordinary one: a model without fp8 loads it and computes what it computed before
    loaded = GPT(model.config)
    loaded.load_state_dict(model.state_dict(), strict=True)
    assert not any(isinstance(m, Float8Linear) for m in loaded.modules())
    idx = torch.randint(0, 200, (2, 16))
    torch.testing.assert_close(loaded(idx), plain(idx), rtol=0, atol=0)
    assert 1e-4 < (model(idx) - plain(idx)).abs().max() < 0.5  # the fp8 model computes in fp8


def test_enable_fp8_refuses_widths_that_are_not_multiples_of_16():
    model = random_gpt(n_embd=72, n_head=3, n_kv_head=3)  # head_dim 24: all widths are multiples of 8 only
    with pytest.raises(ValueError, match=r"multiples of 16.*transformer\.h\.0\.attn\.c_q \(72 -> 72\)"):
        enable_fp8(model, allow_cpu=True)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())  # nothing half-swapped
    with pytest.raises(SystemExit, match="multiples of 16"):
        maybe_enable_fp8(model, True, "cpu", allow_cpu=True)


CPU_REASON = "--fp8 needs a CUDA GPU with compute capability 8.9+ (H100/H200, L4, RTX 4090); this device is cpu"


def test_unsupported_devices_get_one_clear_sentence(monkeypatch):
    assert fp8_unsupported_reason("cpu") == CPU_REASON
    assert fp8_unsupported_reason(torch.device("cpu"), allow_cpu=True) is None
    assert "this device is mps" in fp8_unsupported_reason("mps", allow_cpu=True)  # allow_cpu is for CPUs only
    model = random_gpt()
    with pytest.raises(SystemExit, match=r"^error: --fp8 needs a CUDA GPU .* this device is cpu$"):
        maybe_enable_fp8(model, True, "cpu")
    with pytest.raises(RuntimeError, match="this device is cpu"):
        enable_fp8(model)
    assert maybe_enable_fp8(model, False, "cpu") == 0
    assert not any(isinstance(m, Float8Linear) for m in model.modules())
    assert maybe_enable_fp8(model, True, "cpu", allow_cpu=True) == 12
    # CUDA devices by compute capability (simulated): 8.9 is the first with fp8 tensor cores
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    for capability, ok in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        reason = fp8_unsupported_reason("cuda")
        assert (reason is None) == ok, (capability, reason)
        if not ok:
            assert reason.endswith(f"NVIDIA A100-SXM4-80GB has {capability[0]}.{capability[1]}")
    monkeypatch.setattr(fp8, "scaled_mm", None)  # a torch without the op
    assert "needs a torch with float8 dtypes and torch._scaled_mm" in fp8_unsupported_reason("cuda")


def loss_curve(model, batches, steps):
    # plain AdamW: the project's Muon would do too, but costs ~1 s a step on 2 busy cores
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = model(x, y)
        loss.backward()
        if step == 0:
            grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads


def test_a_tiny_gpt_trains_with_fp8_like_fp32(cuda_rules):
    base = random_gpt(seed=4)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 200, (2, 16), generator=g), torch.randint(0, 200, (2, 16), generator=g))
               for _ in range(2)]
    fp32_losses, _ = loss_curve(copy.deepcopy(base), batches, 8)
    model = copy.deepcopy(base)
    enable_fp8(model, allow_cpu=True)
    fp8_losses, grads = loss_curve(model, batches, 8)
    assert len(cuda_rules) == 8 * 12 * 3  # every step, every block linear, all three matmuls in fp8
    for name, grad in grads.items():  # gradients reach every parameter, block linears included
        assert torch.isfinite(grad).all() and grad.abs().max() > 0, name
    assert fp32_losses[-1] < fp32_losses[0] - 0.5  # it learns: two batches, memorised
    # each block linear's output is off by a few percent (see the forward test), which moves the loss of
    # a random model by about 1%: a loose 3% of the loss, step by step, still catches a wrong gradient scale
    for a, b in zip(fp8_losses, fp32_losses):
        assert abs(a - b) < 0.03 * b, (fp8_losses, fp32_losses)


def test_compiled_equals_eager():
    # inductor compiles the fp8 linear on the CPU too: one graph (fullgraph, under bf16 autocast as on a
    # GPU), forward and backward equal to eager up to bf16 rounding of the output. The bf16 outputs may
    # round differently (the CPU's eager _scaled_mm and inductor's kernel sum in different orders; on some
    # Xeons about a tenth of the elements land one bf16 step apart), so each is held to the dequantised
    # reference within two bf16 steps of the largest output (2 * 2^-7 * max|y|); a plain bf16 linear (the
    # fp8 path skipped) is over twice that away from it
    linear = random_linear(64, 32, seed=6)
    f8 = Float8Linear.from_linear(linear)
    compiled = torch.compile(f8, fullgraph=True, dynamic=False)
    x = torch.randn(2, 16, 64)
    grad_y = torch.randn(2, 16, 32)
    results = []
    for module in (f8, compiled):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(xi)
        y.backward(grad_y.to(y.dtype))
        results.append((y, xi.grad, linear.weight.grad))
        linear.weight.grad = None
    (y_eager, gx_eager, gw_eager), (y_compiled, gx_compiled, gw_compiled) = results
    assert y_compiled.dtype == torch.bfloat16 and gw_compiled.dtype == torch.float32
    emulated = dequantised(x, E4M3) @ dequantised(linear.weight, E4M3).T
    bf16_steps = 2 * 2.0 ** -7 * emulated.abs().max().item()
    for y in (y_eager, y_compiled):
        torch.testing.assert_close(y.float(), emulated.float(), rtol=0, atol=bf16_steps)
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=bf16_steps)
    torch.testing.assert_close(gx_compiled, gx_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw_compiled, gw_eager, rtol=1e-5, atol=1e-6)
