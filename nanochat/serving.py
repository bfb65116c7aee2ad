"""
Serving-side choices about a model replica: the weight dtype it serves in (serving_model; `auto` times
this model's real decode step in fp32 and bf16 on a CPU). The server (scripts/chat_web.py) uses it.
"""

import copy
import time

import torch

from nanochat.common import parse_dtype
from nanochat.kv_cache import KVCache

def decode_seconds(model, rows=(1, 8), steps=2):
    """Seconds of `steps` single-token forwards at each row count after an 8-token prefix, on one thread (the
    batch scheduler's): what one decode step costs this replica."""
    c, device = model.config, model.get_device()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        total = 0.0
        with torch.inference_mode():
            for r in rows:
                cache = KVCache(r, c.n_kv_head, 8 + steps + 1, c.n_embd // c.n_head, c.n_layer)
                model(torch.zeros(r, 8, dtype=torch.long, device=device), kv_cache=cache)
                token = torch.zeros(r, 1, dtype=torch.long, device=device)
                model(token, kv_cache=cache)  # warm-up
                t0 = time.perf_counter()
                for _ in range(steps):
                    model(token, kv_cache=cache)
                total += time.perf_counter() - t0
        return total
    finally:
        torch.set_num_threads(threads)


def serving_model(model, name, device_type):
    """
    The replica in the weight dtype it serves in (name: --dtype, or a torch.dtype another replica was given).
    A replica only decodes, so when bf16 is chosen its weights are stored in bf16 (half the bytes read per
    token), not cast at every use as under autocast.
    auto: bf16 on CUDA; on a CPU, bf16 only where this model's decode step measures clearly faster in it
    (at start-up, on a bf16 copy: bf16 is emulated on many CPUs, and pays on others); fp32 otherwise.
    """
    if isinstance(name, torch.dtype):  # already chosen (another replica)
        return model.to(name)
    if name != "auto" or device_type != "cpu":
        return model.to(parse_dtype(name, device_type))
    t32 = decode_seconds(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    t16 = decode_seconds(bf16)
    use = t16 < 0.9 * t32
    print(f"nanochat chat server: decode weights in {'bf16' if use else 'fp32'} (a decode step measured "
          f"{t16 / t32:.2f}x as long in bf16 on this CPU)", flush=True)
    return bf16 if use else model
