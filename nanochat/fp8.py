"""
FP8 training (`--fp8`): the Transformer blocks' linears multiply in float8 on GPUs that have fp8 tensor
cores (CUDA compute capability 8.9+: H100/H200, L4, RTX 4090), twice the bf16 matmul peak.

The recipe is tensorwise scaling (Micikevicius et al. 2022, "FP8 Formats for Deep Learning"; torchao's
float8 "tensorwise" training is the same idea): before each matmul a whole tensor gets one fp32 scale,
chosen so its largest magnitude (amax) lands on the format's largest finite value, then it is rounded
to float8; torch._scaled_mm multiplies the float8 operands, accumulates in fp32 and multiplies the
result by both inverse scales, so the output is in real units.
- forward, y = x @ W^T: x and W in float8_e4m3fn (3 mantissa bits, max 448): precision matters most
- backward: grad_y in float8_e5m2 (2 mantissa bits, max 57344): gradients span a wider range. Both
  gradient matmuls are fp8, so every one of the three matmuls of a linear runs on fp8 tensor cores:
      grad_x = grad_y @ W       (e5m2 x e4m3, the saved float8 W)
      grad_W = grad_y^T @ x     (e5m2 x e4m3, the saved float8 x: the same rounding the forward saw)
  Saving the float8 x instead of x also halves the activation memory these linears keep for backward.
What stays as it was: the master weights (fp32 under bf16 autocast, or bf16), their gradients and the
optimizer state (grad_W comes out in the weight's dtype); the lm_head (its logits feed a softmax over
the whole vocabulary, so its errors go straight into the loss: recipes keep the last layer in high
precision), the embedding (a lookup), attention's own matmuls, norms and the loss.

torch._scaled_mm's CUDA rules (the op on a CPU accepts more, so tests check these rules themselves): the
left operand row-major, the right one column-major, its inner dimension and both of the right operand's
dimensions multiples of 16, one fp32 scale per operand, not both operands e5m2. The model's widths are
checked when the linears are swapped (a clear error); the number of rows (batch x time) is checked per
call, and a call whose rows are not a multiple of 16 (a decode step, an odd eval batch) runs the
ordinary linear instead. Shapes are static under torch.compile(dynamic=False), so that choice is made
at trace time: the hot path has no data-dependent Python branch and no .item() (scales stay on the
device). The parameters are the same Parameter objects as before the swap, so optimizers, DDP, the
state dict's keys and the saved checkpoint are unchanged: a checkpoint trained with fp8 loads anywhere.
"""

import math

import torch
import torch.nn as nn

E4M3 = getattr(torch, "float8_e4m3fn", None)  # None on a torch without float8 dtypes
E5M2 = getattr(torch, "float8_e5m2", None)
# amax is clamped to this before dividing: an all-zero tensor gets a finite scale (448 / 1e-12) and
# quantises to zeros, never 0/0 = NaN; and fp32 holds 57344 / 1e-12, so the scale never overflows to inf
AMAX_EPS = 1e-12
# _scaled_mm on CUDA wants these dimensions in multiples of 16 (the fp8 tensor-core tile)
FP8_ALIGN = 16
CAPABLE_GPUS = "H100/H200, L4, RTX 4090"
# every fp8 matmul goes through this name (tests wrap it to check each call against the CUDA rules;
# patching torch itself would also change what torch.compile's tracer believes the op is)
scaled_mm = getattr(torch, "_scaled_mm", None)


def fp8_unsupported_reason(device, allow_cpu=False):
    """
    None when float8 training can run on `device`; otherwise one sentence saying why not. Real runs
    need CUDA with compute capability 8.9+. allow_cpu (tests and the --tiny GPU check only) accepts a
    CPU whose torch has the op: it computes the same numbers, slowly.
    """
    device = torch.device(device)
    if E4M3 is None or E5M2 is None or scaled_mm is None:
        return f"--fp8 needs a torch with float8 dtypes and torch._scaled_mm (2.1 or newer); this is torch {torch.__version__}"
    if device.type == "cpu" and allow_cpu:
        return None
    if device.type != "cuda":
        return (f"--fp8 needs a CUDA GPU with compute capability 8.9+ ({CAPABLE_GPUS}); "
                f"this device is {device.type}")
    if getattr(torch.version, "hip", None):
        return "--fp8 supports NVIDIA GPUs only (AMD's float8 formats are the fnuz variants, which this code does not use)"
    if not torch.cuda.is_available():
        return "--fp8 needs a CUDA GPU, and torch sees none"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return (f"--fp8 needs a CUDA GPU with compute capability 8.9+ ({CAPABLE_GPUS}); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}")
    return None


def to_fp8(t, fp8_dtype):
    """
    (t rounded to fp8_dtype after scaling, the fp32 inverse scale): t ~= fp8.float() * inverse. One
    scale for the whole tensor, from its amax, computed in fp32 on the device.
    """
    fp8_max = torch.finfo(fp8_dtype).max
    t32 = t.float()
    amax = t32.abs().amax().clamp_min(AMAX_EPS)
    scale = fp8_max / amax
    # clamp: fp32 rounding can put amax * scale a hair above the max, and a float8 cast does not
    # saturate on every backend (e5m2 overflows to inf, e4m3fn has no inf)
    fp8 = (t32 * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return fp8, scale.reciprocal()


def column_major(t):
    """The same matrix with column-major storage (what _scaled_mm wants as its right operand)."""
    return t.t().contiguous().t()


class Float8Matmul(torch.autograd.Function):
    """y = x @ W^T with x (M, K), W (N, K), all three matmuls in float8 (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_inv = to_fp8(x.contiguous(), E4M3)  # row-major, whatever view came in
        w8, w_inv = to_fp8(weight, E4M3)
        # w8 is (N, K) row-major, so its transpose (K, N) is already column-major: no copy
        y = scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.grad_dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.grad_dtypes
        g8, g_inv = to_fp8(grad_y.contiguous(), E5M2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # (M, N) @ (N, K)
            grad_x = scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=x_dtype)
        if ctx.needs_input_grad[1]:  # (N, M) @ (M, K), in the master weight's dtype
            grad_w = scaled_mm(g8.t().contiguous(), column_major(x8), scale_a=g_inv, scale_b=x_inv,
                               out_dtype=w_dtype)
        return grad_x, grad_w, None


class Float8Linear(nn.Linear):
    """
    An nn.Linear whose matmuls run in float8 (Float8Matmul), holding the weight (and bias) Parameters
    of the linear it replaced. Rows (batch x time) not a multiple of 16 fall back to the plain linear.
    """

    @classmethod
    def from_linear(cls, linear):
        with torch.device("meta"):  # no memory for a weight that is replaced on the next line
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        if linear.bias is not None:
            new.bias = linear.bias
        return new

    def forward(self, x):
        rows = math.prod(x.shape[:-1])
        if rows == 0 or rows % FP8_ALIGN != 0:  # a static shape under compile: decided at trace time
            return super().forward(x)
        device_type = x.device.type
        # the dtype nn.Linear would return: the autocast dtype inside autocast, else the input's
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        y = Float8Matmul.apply(x.reshape(rows, self.in_features), self.weight, out_dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


def block_linears(model):
    """(parent module, attribute name, qualified name, linear) for every nn.Linear inside model.transformer.h."""
    found = []
    for parent_name, parent in model.transformer.h.named_modules(prefix="transformer.h"):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((parent, name, f"{parent_name}.{name}", child))
    return found


def enable_fp8(model, allow_cpu=False):
    """
    Replace every nn.Linear inside model.transformer.h (attention c_q/c_k/c_v/c_proj, MLP c_fc/c_proj)
    by a Float8Linear holding the same Parameters, in place; the lm_head and the embedding stay as
    they are. Call it after the weights are initialised (or loaded) and before torch.compile. Returns
    the qualified names swapped. Raises RuntimeError when the device cannot run fp8 (allow_cpu: see
    fp8_unsupported_reason) and ValueError when a width is not a multiple of 16 (nothing is swapped then).
    """
    reason = fp8_unsupported_reason(next(model.parameters()).device, allow_cpu)
    if reason:
        raise RuntimeError(reason)
    targets = [t for t in block_linears(model) if type(t[3]) is nn.Linear]  # already-swapped ones stay
    bad = [f"{name} ({linear.in_features} -> {linear.out_features})" for _, _, name, linear in targets
           if linear.in_features % FP8_ALIGN or linear.out_features % FP8_ALIGN]
    if bad:
        raise ValueError(f"fp8 matmuls need widths that are multiples of {FP8_ALIGN}; these linears are not: "
                         + ", ".join(bad) + " (pick --depth/--head-dim so n_embd and head_dim are multiples of 16)")
    for parent, attr, _, linear in targets:
        setattr(parent, attr, Float8Linear.from_linear(linear))
    return [name for _, _, name, _ in targets]


def maybe_enable_fp8(model, enabled, device, allow_cpu=False):
    """
    What a training script calls for its --fp8 flag: nothing when not enabled; else the block linears
    go fp8, or the run stops with the reason (SystemExit) when this device cannot. Returns the number
    of linears swapped.
    """
    if not enabled:
        return 0
    reason = fp8_unsupported_reason(device, allow_cpu)
    if reason:
        raise SystemExit(f"error: {reason}")
    try:
        return len(enable_fp8(model, allow_cpu))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
