"""
No float64 on the device: Apple MPS has no float64, so a float64 accumulator anywhere in a training
step or an evaluation breaks the README's MPS support. On a CPU-only machine the CPU is the device,
so the guard here fails on any op that produces a float64 tensor, whatever its device: a training
step (Muon + AdamW, the step's loss and token count summed over ranks), base bits per byte, SFT's
masked val loss, and RL's per-step statistics all run under it. Python floats on the host are fine.
"""

import pytest
import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from nanochat.gpt import GPT, GPTConfig
from nanochat.loss_eval import evaluate_bpb, evaluate_loss
from nanochat.training import all_sum, train_step

NO_AUTOCAST = torch.autocast("cpu", enabled=False)


class NoFloat64(TorchDispatchMode):
    """Raises on the first op (forward, backward or optimizer) whose output holds a float64 tensor."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"{func} made a float64 tensor on {t.device}")
        return out


def test_the_guard_catches_float64():
    with pytest.raises(AssertionError, match="float64"), NoFloat64():
        torch.zeros(2, dtype=torch.float64)
    with pytest.raises(AssertionError, match="float64"), NoFloat64():
        torch.ones(3).double().sum()
    with NoFloat64():
        torch.ones(3, dtype=torch.float32).sum()  # float32 passes


def tiny_model():
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=32, vocab_size=96, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    model.init_weights()
    with torch.no_grad():  # random, not freshly initialised: zero projections would make every logit 0
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def test_train_step_and_evals_make_no_float64():
    model = tiny_model()
    optimizers = model.setup_optimizers()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 96, (2, 32), generator=g), torch.randint(0, 96, (2, 32), generator=g))
               for _ in range(3)]
    batches[0][1][:, :5] = -1  # ignored targets, as SFT's loss mask makes them
    weights = torch.tensor([0.5, -0.5])  # RL's per-row advantages
    token_bytes = torch.randint(0, 4, (96,), generator=g)
    with NoFloat64():
        for _ in range(2):  # the second step runs the optimizers with state (momentum, Adam moments)
            loss, tokens = train_step(model, optimizers, batches[:2], NO_AUTOCAST)
        rl_loss, _ = train_step(model, optimizers, [(*batches[2], weights)], NO_AUTOCAST)
        model.eval()
        bpb, evaluated = evaluate_bpb(model, batches, 10, token_bytes, autocast=NO_AUTOCAST)
        val_loss, val_tokens = evaluate_loss(model, iter(batches), autocast=NO_AUTOCAST)
        reward_sum, samples, sampled_tokens = all_sum([2.0, 3, 41], "cpu")  # RL's step statistics
    assert tokens == 2 * 2 * 32 - 2 * 5 and val_tokens == evaluated == 3 * 2 * 32 - 2 * 5  # one pass, no more
    assert all(x == x and abs(x) != float("inf") for x in (loss, rl_loss, bpb, val_loss))
    assert (reward_sum, samples, sampled_tokens) == (2.0, 3.0, 41.0)
    assert [p.dtype for p in model.parameters()] == [torch.float32] * len(list(model.parameters()))
