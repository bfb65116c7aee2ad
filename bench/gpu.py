"""
The GPU check: one prepared script that runs the CUDA paths of the pipeline in a few minutes and
says, row by row, what agreed, what it measured and what failed.

    python -m bench.gpu                       # on a CUDA machine: every check, ~8 minutes on one H100/H200
    python -m bench.gpu --device cpu --tiny   # the same logic in seconds on a CPU (the test suite runs this)
    python -m bench.gpu --checks reference,compile --out /tmp/gpu_out

Rows: (1) CUDA vs a CPU fp32 reference on a small model with the same weights: logits, loss, every
gradient, one Muon+AdamW step; bf16 autocast loss. (2) torch.compile: recompilations over the steps
after warm-up (goal 0), compiled == eager loss. (2b) the architecture additions of issue 22, every field on,
windows shorter than the sequence: logits and gradients vs the CPU fp32 reference, compiled vs eager loss
(and gradients on CUDA, where compiled windows run FlexAttention), and the KV-cached greedy decode (windows
and smear in the cache path) vs the no-cache forward. (3) d20 training throughput (full-profile shapes:
device batch 32 x 2048, vocab 32768, compiled) under a memory cap of 80 GB (as an H100): peak memory
vs the dry run's estimate, tokens/s, MFU against the H100 bf16 dense peak (989 TFLOP/s; the H200's
dense bf16 peak is the same). (4) decode at d20 (the model + KVCache step the Engine runs): tok/s at
batch 1 and 8, prefill tok/s, KV-cache memory; and the serving path, continuous batching's static
decode step (BatchScheduler, compiled with CUDA graphs on a GPU) with 1 and 8 requests. (5) `torchrun --standalone --nproc_per_node=1` through
the real scripts.base_train (NCCL on a GPU, gloo on a CPU), so the optimizers' collectives run. (6) --fp8
(nanochat/fp8.py) at d12 (seq 2048, device batch 16, the fixture tokenizer's vocabulary, real text from
tests/data): 20 compiled steps in bf16 and 20 in fp8 from the same init on the same batches: the loss gap
(mean of the last 5 steps), tokens/s of each and their ratio, peak memory, graph breaks; on a device
without fp8 (compute capability < 8.9) one row says it was skipped and why, which is not a failure.
--tiny shrinks every size (depth 2, short rows) but runs the same code (the fp8 check on a CPU through
fp8's allow_cpu switch, fp8 against fp32, eager). Writes OUT/gpu_check.md and
OUT/gpu_check.json; exits 1 when a check fails. Needs torch, numpy, tiktoken, pyarrow, safetensors
and this repository's pure-Python packages: no rustbpe (the tokenizer comes from bench/fixtures).
"""

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch

from nanochat.batching import BatchScheduler
from nanochat.common import GPU_BF16_PEAK, autocast_ctx, measure_matmul_peak, open_text
from nanochat.engine import Engine, KVCache
from nanochat.fp8 import enable_fp8, fp8_unsupported_reason
from nanochat.gpt import FLEX_DEVICES, GPT, GPTConfig, config_for_depth
from nanochat.tokenizer import RustBPETokenizer
from nanochat.training import train_step

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_TOKENIZER = os.path.join(REPO_ROOT, "bench", "fixtures", "tokenizer")
PRETRAIN_TEXT = os.path.join(REPO_ROOT, "tests", "data", "pretrain")
CHECKS = ["reference", "compile", "additions", "d20", "decode", "torchrun", "fp8"]
# tolerances, each a relative error (max |a - b| / max |b|) unless named abs: fp32 on two devices differs
# only by summation order; bf16 keeps 8 bits of mantissa, so its loss moves in the 2nd-3rd digit
TOL = {"logits": 1e-4, "loss_abs": 1e-4, "grad": 1e-3, "step": 1e-3, "bf16_loss_abs": 0.05, "compile_loss_abs": 5e-3,
       # fp8 rounds each block matmul's operands by up to 2^-4 (x, W) and 2^-3 (gradients); after 20 steps of real
       # text the two runs' losses (mean of the last 5 steps, ~5 nats) should agree to ~1%, as published recipes report
       "fp8_loss_abs": 0.1}
H100_BF16 = GPU_BF16_PEAK["h100"]
H200_BF16 = GPU_BF16_PEAK["h200"]
CARD_BYTES = 80e9  # behave as an 80 GB card


def rel_err(a, b):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def small_config(tiny):
    # head_dim 128 (flash-eligible on CUDA), 2 query heads per kv head (GQA), a vocab that is not a multiple of 64
    return GPTConfig(sequence_len=128 if tiny else 256, vocab_size=1000, n_layer=2, n_head=2, n_kv_head=1, n_embd=256)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections would make every logit 0
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def make_reference(model):
    """The CPU fp32 copy every device result is compared with."""
    return copy.deepcopy(model).to("cpu", torch.float32)


def check_reference(device, tiny, rows):
    """Same weights, same inputs: the device against the CPU fp32 reference."""
    config = small_config(tiny)
    model = random_model(config)
    ref = make_reference(model)
    dev = copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g)
    y = torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g)
    old_precision = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"  # strict fp32 for the comparison (training uses TF32)
    try:
        with torch.no_grad():
            ref_logits, dev_logits = ref(x), dev(x.to(device))
        rows.append(row("reference: logits (fp32)", rel_err(dev_logits, ref_logits), TOL["logits"],
                        note=f"logits std {ref_logits.std().item():.3f}"))
        ref_loss, dev_loss = ref(x, y), dev(x.to(device), y.to(device))
        rows.append(row("reference: loss (fp32, abs)", abs(dev_loss.item() - ref_loss.item()), TOL["loss_abs"],
                        note=f"loss {ref_loss.item():.4f}"))
        ref_loss.backward()
        dev_loss.backward()
        worst = max(rel_err(pd.grad, pr.grad) for pd, pr in zip(dev.parameters(), ref.parameters()))
        rows.append(row("reference: gradients (fp32, worst tensor)", worst, TOL["grad"]))
        # one optimizer step (Newton-Schulz in fp32 on both, so the two run the same math)
        for m in (ref, dev):
            for opt in m.setup_optimizers(ns_dtype=torch.float32):
                opt.step()
        worst = max(rel_err(pd, pr) for pd, pr in zip(dev.parameters(), ref.parameters()))
        rows.append(row("reference: Muon+AdamW step (fp32, worst tensor)", worst, TOL["step"]))
        dev.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast_ctx(device.type, torch.bfloat16):
            bf16_loss = dev(x.to(device), y.to(device)).item()
        with torch.no_grad():
            fp32_loss = ref(x, y).item()
        rows.append(row("reference: bf16 autocast loss vs fp32 (abs)", abs(bf16_loss - fp32_loss), TOL["bf16_loss_abs"],
                        note=f"bf16 {bf16_loss:.4f}, fp32 {fp32_loss:.4f}"))
    finally:
        torch.backends.cuda.matmul.fp32_precision = old_precision


def check_additions(device, tiny, rows):
    """Issue 22's architecture, every field on (windows shorter than the sequence): the device vs the CPU fp32
    reference (logits, gradients), compiled vs eager loss with no recompilation, and the KV-cached greedy decode
    (prefill, then one token a step: windows and smear in the cache path) vs the no-cache forward."""
    from torch._dynamo.utils import counters
    config = replace(small_config(tiny), value_embeds=True, resid_mix=True, smear=True, backout=True, qk_scale=1.2,
                     rope_base=100000.0, window_pattern="SL", short_window=32)
    model = random_model(config)
    ref, dev = make_reference(model), copy.deepcopy(model).to(device)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g)
    y = torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g)
    old_precision = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        with torch.no_grad():
            rows.append(row("additions: logits vs CPU fp32", rel_err(dev(x.to(device)), ref(x)), TOL["logits"]))
        ref(x, y).backward()
        dev(x.to(device), y.to(device)).backward()
        worst = max(rel_err(pd.grad, pr.grad) for pd, pr in zip(dev.parameters(), ref.parameters()))
        rows.append(row("additions: gradients vs CPU fp32 (worst tensor)", worst, TOL["grad"]))
    finally:
        torch.backends.cuda.matmul.fp32_precision = old_precision
    dev.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(dev, dynamic=False)
    with torch.no_grad():
        eager_loss = dev(x.to(device), y.to(device)).item()
        losses = [compiled(x.to(device), y.to(device)).item() for _ in range(3)]
    rows.append(row("additions: compiled vs eager loss (abs)", abs(losses[-1] - eager_loss), TOL["compile_loss_abs"],
                    note=f"{counters['frames']['total']} frame(s) compiled over 3 calls"))
    if device.type in FLEX_DEVICES:  # compiled, the windows run through FlexAttention: its backward too
        dev(x.to(device), y.to(device)).backward()
        eager_grads = [p.grad for p in dev.parameters()]
        dev.zero_grad(set_to_none=True)
        compiled(x.to(device), y.to(device)).backward()
        worst = max(rel_err(p.grad, e) for p, e in zip(dev.parameters(), eager_grads))
        rows.append(row("additions: compiled (FlexAttention windows) vs eager gradients", worst, TOL["grad"]))
    prompt, new = x[:1, :48].to(device), 24  # past the 32-key window, so decode must drop keys
    with torch.inference_mode():
        cache = KVCache(1, config.n_kv_head, prompt.size(1) + new, config.n_embd // config.n_head, config.n_layer)
        token = dev(prompt, kv_cache=cache)[:, -1:].argmax(-1)
        cached = [token]
        for _ in range(new - 1):
            cached.append(dev(cached[-1], kv_cache=cache)[:, -1:].argmax(-1))
        ids = prompt
        for _ in range(new):
            ids = torch.cat([ids, dev(ids)[:, -1:].argmax(-1)], dim=1)
    mismatches = (torch.cat(cached, dim=1) != ids[:, prompt.size(1):]).sum().item()
    rows.append(row(f"additions: cached greedy decode vs no-cache, tokens differing of {new}", mismatches, 0))


def check_compile(device, tiny, rows):
    """torch.compile(dynamic=False) over fixed shapes: no recompilation after the first step; same loss as eager."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    config = small_config(tiny)
    model = random_model(config).to(device)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, dynamic=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = autocast_ctx(device.type, dtype)
    steps = 4 if tiny else 20
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g).to(device),
                torch.randint(0, config.vocab_size, (4, config.sequence_len), generator=g).to(device)) for _ in range(steps)]
    with autocast:
        eager_loss = eager(*batches[0]).item()
    optimizers = model.setup_optimizers()
    t0 = time.perf_counter()
    first_loss, _ = train_step(compiled, optimizers, [batches[0]], autocast)
    sync(device)
    warmup_s = time.perf_counter() - t0
    after_warmup = counters["frames"]["total"]
    t0 = time.perf_counter()
    for batch in batches[1:]:
        train_step(compiled, optimizers, [batch], autocast)
    sync(device)
    recompiles = counters["frames"]["total"] - after_warmup
    rows.append(row(f"compile: recompilations over steps 2-{steps}", recompiles, 0,
                    note=f"first step {warmup_s:.1f} s (compiling), then {(time.perf_counter() - t0) / (steps - 1) * 1e3:.1f} ms/step; "
                         f"graph breaks {sum(counters['graph_break'].values())}"))
    rows.append(row("compile: compiled vs eager loss (abs)", abs(first_loss - eager_loss), TOL["compile_loss_abs"],
                    note=f"{first_loss:.4f} vs {eager_loss:.4f}"))


def dry_run_memory(depth, seq, batch, total_batch, vocab):
    """The dry run's estimated memory per device (GiB), or None when its line is missing."""
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", "--dry-run", "--depth", str(depth), "--max-seq-len",
                        str(seq), "--device-batch-size", str(batch), "--total-batch-size", str(total_batch),
                        "--num-iterations", "10", "--device-type", "cpu", "--assume-device", "h100", "--assume-world-size", "1"],
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, NANOCHAT_BASE_DIR=tempfile.mkdtemp(prefix="nanochat-gpu-dry-")))
    m = re.search(r"estimated memory per device: .*\| total ([\d.]+) GiB", r.stdout)
    return float(m.group(1)) if m else None


def check_d20(device, tiny, rows):
    """Training throughput at the full profile's shapes (or tiny ones), compiled, bf16 on CUDA."""
    depth, seq, batch, accum, steps, vocab = (2, 128, 2, 2, 3, 1000) if tiny else (20, 2048, 32, 2, 12, 32768)
    cuda = device.type == "cuda"
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, CARD_BYTES / total), device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    config = config_for_depth(depth, vocab, seq)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    flops_per_token = model.estimate_flops()
    compiled = torch.compile(model, dynamic=False) if cuda else model  # compile on a CPU is timed by bench.train
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = autocast_ctx(device.type, dtype)
    optimizers = model.setup_optimizers()
    g = torch.Generator().manual_seed(3)
    micro = [(torch.randint(0, vocab, (batch, seq), generator=g).to(device),
              torch.randint(0, vocab, (batch, seq), generator=g).to(device)) for _ in range(accum)]
    for _ in range(2):  # warm-up: compilation, allocator, kernels
        train_step(compiled, optimizers, micro, autocast)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = train_step(compiled, optimizers, micro, autocast)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens_per_s = steps * accum * batch * seq / seconds
    peak = H100_BF16 if cuda else measure_matmul_peak(device, dtype)
    mfu = flops_per_token * tokens_per_s / peak
    label = f"d{depth} train"
    rows.append(row(f"{label}: tokens/s", tokens_per_s, None, note=f"{steps} steps x {accum} x {batch} x {seq} tokens, "
                    f"loss {loss:.3f}, {flops_per_token:.3e} FLOPs/token"))
    rows.append(row(f"{label}: MFU", mfu, None, note=("vs 989 TFLOP/s (H100 bf16 dense; H200 dense bf16 "
                                                      f"{H200_BF16 / 1e12:.0f} TFLOP/s)") if cuda else
                    f"vs the measured fp32 matmul peak {peak / 1e9:.0f} GFLOP/s"))
    if cuda:
        used = torch.cuda.max_memory_allocated(device) / 2**30
        estimate = dry_run_memory(depth, seq, batch, batch * seq * accum, vocab)
        ok = used * 2**30 <= CARD_BYTES
        rows.append(row(f"{label}: peak memory (GiB, cap 80 GB)", used, CARD_BYTES / 2**30, ok=ok,
                        note=f"dry-run estimate {estimate if estimate is not None else '?'} GiB (eager upper bound)"))
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    del compiled, model, optimizers, micro
    if cuda:
        torch.cuda.empty_cache()


def check_decode(device, tiny, rows):
    """The Engine's inner loop (model forward + KVCache) at d20: prefill, then one token per row per step."""
    depth, vocab, prompt_len, new = (2, 2048, 32, 16) if tiny else (20, 32768, 1024, 128)  # >= the fixture tokenizer
    cuda = device.type == "cuda"
    config = config_for_depth(depth, vocab, 2048)
    model = random_model(config).to(device).eval()
    autocast = autocast_ctx(device.type, torch.bfloat16 if cuda else torch.float32)
    head_dim = config.n_embd // config.n_head
    prompt = torch.randint(0, vocab, (1, prompt_len), device=device)
    with torch.inference_mode(), autocast:
        for b in (1, 8):
            cache = KVCache(1, config.n_kv_head, prompt_len + new, head_dim, config.n_layer)
            sync(device)
            t0 = time.perf_counter()
            logits = model(prompt, kv_cache=cache)
            sync(device)
            prefill_s = time.perf_counter() - t0
            if b > 1:
                cache = cache.replicate(b, prompt_len + new)
            token = logits[:, -1:].argmax(-1).expand(b, 1).contiguous()
            model(token, kv_cache=cache)  # one warm-up step
            sync(device)
            t0 = time.perf_counter()
            for _ in range(new - 1):
                token = model(token, kv_cache=cache)[:, -1:].argmax(-1)
            sync(device)
            per_step = (time.perf_counter() - t0) / (new - 1)
            kv_bytes = sum(t.nbytes for t in cache.k + cache.v if t is not None)
            rows.append(row(f"d{depth} decode batch {b}: tokens/s", b / per_step, None,
                            note=f"{per_step * 1e3:.2f} ms/step; KV cache {kv_bytes / 2**20:.1f} MiB "
                                 f"({prompt_len + new} positions, {cache.k[0].dtype})"))
            if b == 1:
                rows.append(row(f"d{depth} prefill {prompt_len} tokens: tokens/s", prompt_len / prefill_s, None))
    # the serving path: continuous batching's static decode step (compiled, CUDA graphs, on a GPU)
    tokenizer = RustBPETokenizer.from_directory(FIXTURE_TOKENIZER)
    with torch.no_grad():  # keep greedy decoding off the stop tokens, so every request runs its full length
        model.lm_head.weight[[tokenizer.encode_special(t) for t in tokenizer.get_special_tokens()]] = 0
    scheduler = BatchScheduler(Engine(model, tokenizer), slots=8, max_len=prompt_len + new + 8, autocast=autocast,
                               compile="on" if cuda else "off")
    ids = prompt[0].tolist()
    for k in (1, 8):
        for r in [scheduler.submit(ids, max_tokens=new, temperature=0) for _ in range(k)]:  # warm-up, compile
            list(r)
        sync(device)
        t0 = time.perf_counter()
        produced = sum(sum(1 for _ in r) for r in [scheduler.submit(ids, max_tokens=new, temperature=0) for _ in range(k)])
        seconds = time.perf_counter() - t0
        rows.append(row(f"d{depth} batched decode, {k} request(s): tokens/s", produced / seconds, None,
                        note=f"BatchScheduler, {'compiled' if scheduler.compiled is not None else 'eager'} step; "
                             f"{seconds / new * 1e3:.2f} ms/step"))
    scheduler.close()


def check_torchrun(device, tiny, rows):
    """The real base_train under torchrun with one process: the process group (NCCL on CUDA) and the
    optimizers' collectives run, a checkpoint is written."""
    from nanochat.text_shards import prepare
    base = tempfile.mkdtemp(prefix="nanochat-gpu-base-")
    try:
        prepare([PRETRAIN_TEXT], shard_chars=400_000, val_chars=50_000, out_dir=os.path.join(base, "base_data"))
        RustBPETokenizer.from_directory(FIXTURE_TOKENIZER).save(os.path.join(base, "tokenizer"))
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        if not os.path.exists(torchrun):
            torchrun = shutil.which("torchrun") or torchrun
        seq, batch = (128, 4) if tiny else (1024, 16)
        cmd = [torchrun, "--standalone", "--nproc_per_node=1", "-m", "scripts.base_train", "--depth", "2",
               "--head-dim", "64", "--max-seq-len", str(seq), "--device-batch-size", str(batch),
               "--total-batch-size", str(2 * seq * batch), "--num-iterations", "3", "--eval-every", "-1",
               "--eval-tokens", str(seq * batch), "--sample-every", "-1", "--save-every", "-1",
               "--device-type", device.type, "--dtype", "bfloat16" if device.type == "cuda" else "float32"]
        env = dict(os.environ, NANOCHAT_BASE_DIR=base, OMP_NUM_THREADS="2")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        backend = re.search(r"distributed: backend (\w+)", r.stdout)
        want = "nccl" if device.type == "cuda" else "gloo"
        saved = os.path.isdir(os.path.join(base, "base_checkpoints", "d2"))
        ok = r.returncode == 0 and backend is not None and backend.group(1) == want and saved
        rows.append(row(f"torchrun x1 base_train ({want})", r.returncode, 0, ok=ok,
                        note=f"{time.perf_counter() - t0:.0f} s; backend {backend.group(1) if backend else 'not initialised'}; "
                             f"checkpoint {'written' if saved else 'missing'}" + ("" if r.returncode == 0 else
                                                                                  f"; {first_error(r.stderr)}")))
    finally:
        shutil.rmtree(base, ignore_errors=True)


def text_tokens(tokenizer, device):
    """Real text (Shakespeare and two Gutenberg books from tests/data) as one token stream on the device."""
    paths = [os.path.join(PRETRAIN_TEXT, "tinyshakespeare", "input.txt.gz"),
             os.path.join(PRETRAIN_TEXT, "gutenberg", "1342-0.txt.gz"), os.path.join(PRETRAIN_TEXT, "gutenberg", "pg42.txt.gz")]
    texts = []
    for path in paths:
        with open_text(path) as f:
            texts.append(f.read())
    return torch.tensor([t for ids in tokenizer.encode(texts) for t in ids], dtype=torch.long, device=device)


def check_fp8(device, tiny, rows):
    """--fp8 against the ordinary precision: the same init, the same real-text batches, 20 steps each (compiled on
    CUDA). Skipped, with the reason, on a device without fp8 tensor cores; --tiny on a CPU runs the same code through
    allow_cpu (torch's CPU _scaled_mm is a slow reference loop, so the shapes are tiny there)."""
    from torch._dynamo.utils import counters
    reason = fp8_unsupported_reason(device, allow_cpu=tiny)
    if reason:
        rows.append(row("fp8: skipped (not a failure)", None, None, note=reason))
        return
    cuda = device.type == "cuda"
    tokenizer = RustBPETokenizer.from_directory(FIXTURE_TOKENIZER)
    vocab = tokenizer.get_vocab_size()
    if tiny:  # head_dim 16: every width a multiple of 16, as _scaled_mm needs
        config, batch, steps = GPTConfig(sequence_len=16, vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2, n_embd=32), 2, 4
    else:
        config, batch, steps = config_for_depth(12, vocab, 2048), 16, 20
    seq = config.sequence_len
    tokens = text_tokens(tokenizer, device)
    need = steps * batch * seq + 1
    tokens = tokens.repeat(need // tokens.numel() + 1)[:need]  # the text wraps around when a run needs more
    inputs, targets = tokens[:-1].view(steps, batch, seq), tokens[1:].view(steps, batch, seq)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = autocast_ctx(device.type, dtype)
    base = "bf16" if cuda else "fp32"
    warmup = 2  # compilation, allocator, kernels: not timed
    results = {}
    for mode in (base, "fp8"):
        model.load_state_dict(init)
        if mode == "fp8":
            enable_fp8(model, allow_cpu=tiny)
        torch._dynamo.reset()
        counters.clear()
        runner = torch.compile(model, dynamic=False) if cuda else model
        optimizers = model.setup_optimizers()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        losses = []
        for step in range(steps):
            if step == warmup:
                sync(device)
                t0 = time.perf_counter()
            loss, _ = train_step(runner, optimizers, [(inputs[step], targets[step])], autocast)
            losses.append(loss)
        sync(device)
        seconds = time.perf_counter() - t0
        results[mode] = {"losses": losses, "tokens_per_s": (steps - warmup) * batch * seq / seconds,
                         "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                         "graph_breaks": sum(counters["graph_break"].values())}
        del runner, optimizers
    last = min(5, steps)
    mean = {mode: sum(r["losses"][-last:]) / last for mode, r in results.items()}
    label = f"fp8 d{config.n_layer}"
    rows.append(row(f"{label}: loss after {steps} steps, fp8 vs {base} (abs, mean of last {last})",
                    abs(mean["fp8"] - mean[base]), TOL["fp8_loss_abs"],
                    note=f"fp8 {mean['fp8']:.4f}, {base} {mean[base]:.4f} (first step {results[base]['losses'][0]:.4f})"))
    for mode, r in results.items():
        memory = f"; peak memory {r['peak_gib']:.1f} GiB" if cuda else ""
        rows.append(row(f"{label} train {mode}: tokens/s", r["tokens_per_s"], None,
                        note=f"{steps - warmup} timed steps x {batch} x {seq} tokens"
                             f"{', compiled' if cuda else ', eager'}{memory}"))
    rows.append(row(f"{label} train: fp8 / {base} tokens/s", results["fp8"]["tokens_per_s"] / results[base]["tokens_per_s"],
                    None, note="speed-up of the block linears in fp8" if cuda else
                    "on a CPU fp8 is torch's slow reference kernel: only the logic is checked here"))
    if cuda:
        rows.append(row(f"{label}: graph breaks with fp8 (compiled)", results["fp8"]["graph_breaks"], 0))
    del model, init
    if cuda:
        torch.cuda.empty_cache()


def first_error(text):
    """The first 'SomethingError: ...' line of a traceback (torchrun prints its own summary after it)."""
    m = re.search(r"^\w*(?:Error|Exception|Exit)\b.*$", text, re.M)
    return (m.group(0) if m else text[-300:]).replace("|", "/")[:300]


def row(check, value, limit, ok=None, note=""):
    """One result: ok is value <= limit when a limit is given (a measurement without a limit is ok)."""
    if ok is None:
        ok = limit is None or value <= limit
    return {"check": check, "value": value, "limit": limit, "ok": bool(ok), "note": note}


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"


def write_report(out, rows, meta):
    os.makedirs(out, exist_ok=True)
    lines = [f"GPU check on {meta['device_name']} ({meta['date']}, torch {meta['torch']}, {meta['mode']})", "",
             "| check | value | limit | ok | note |", "|---|---:|---:|---|---|"]
    lines += [f"| {r['check']} | {fmt(r['value'])} | {fmt(r['limit'])} | {'yes' if r['ok'] else '**NO**'} | {r['note']} |"
              for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--tiny", action="store_true", help="small sizes everywhere: checks the logic in seconds")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "gpu_out"), help="folder for gpu_check.md/.json")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {unknown}; choose from {','.join(CHECKS)}")
    meta = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "mode": "tiny" if args.tiny else "full",
            "checks": checks}
    rows = []
    functions = {"reference": check_reference, "compile": check_compile, "d20": check_d20, "decode": check_decode,
                 "torchrun": check_torchrun, "fp8": check_fp8,
                 "additions": check_additions}
    for name in checks:
        t0 = time.perf_counter()
        try:
            functions[name](device, args.tiny, rows)
        except Exception as e:  # one broken check must not hide the others' results
            rows.append(row(f"{name}: raised", 1, 0, ok=False, note=f"{type(e).__name__}: {str(e)[:300]}"))
        print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    print(write_report(args.out, rows, meta))
    failed = [r["check"] for r in rows if not r["ok"]]
    if failed:
        print(f"FAILED: {', '.join(failed)}")
        return 1
    print(f"all {len(rows)} rows ok; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
