#!/usr/bin/env bash
# The whole pipeline, one command:   bash speedrun.sh
#
# On a GPU node it trains the full-size model with torchrun on every GPU it finds; without a GPU
# (or with NANOCHAT_PROFILE=tiny) it runs the same stages at a size a laptop CPU finishes quickly.
#
# Environment:
#   NANOCHAT_PROFILE    auto (default: full with GPUs, else tiny) | tiny | full | mini (a few steps per
#                       stage: a check that everything runs, used by the end-to-end test)
#   NANOCHAT_BASE_DIR   where every artifact goes (default ~/.cache/nanochat)
#   NANOCHAT_DATA_URL   base URL of the pretraining shards (https://, http://127.0.0.1:..., file://)
#   NANOCHAT_LOCAL_DATA a folder laid out like shared/data; its pretrain/ text becomes the shards
#   NANOCHAT_VENV       the virtual environment to create/use (default .venv)
#   WANDB_RUN           log to wandb under this run name (unset: no wandb)
#   NANOCHAT_RL         1: run the RL stage (default on the tiny profile), 0: skip it (default on full)
#   NANOCHAT_EXPORTABLE 1: train without the architecture additions export_hf cannot carry (value embeddings,
#                       smear, backout, qk scale, SSSL windows), so the model runs in transformers,
#                       vLLM and MLX-LM (bench/README.md: it gives up 0.03-0.04 val bpb at d4-d6 at equal FLOPs)
#   NPROC               processes per node for torchrun (default: the number of GPUs)
#   NANOCHAT_DEVICE_BATCH  rows per GPU per micro-batch for pretraining (default 32 full, 8 tiny); lower
#                       it when a GPU runs out of memory: gradient accumulation keeps the total batch
#   extra torchrun flags for multi-node (e.g. "--nnodes=2 --node_rank=0 --rdzv_endpoint=host:29500")
#                       go in TORCHRUN_ARGS; the default is --standalone.
#
# Re-running skips the stages whose outputs are complete (and says so) and resumes an interrupted
# training stage. The first failing stage stops the run and is named.
set -euo pipefail
cd "$(dirname "$0")"

export NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
mkdir -p "$NANOCHAT_BASE_DIR"
DONE_DIR="$NANOCHAT_BASE_DIR/.done"
mkdir -p "$DONE_DIR"

# ------------------------------------------------------------------------------------------------
# environment: a venv with the package installed (this also builds the Rust tokenizer)
VENV="${NANOCHAT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import rustbpe, nanochat.gpt" 2>/dev/null || [ "${NANOCHAT_REINSTALL:-0}" = 1 ]; then
    if ! command -v cargo >/dev/null; then
        echo "error: Rust (cargo) is needed to build the tokenizer: curl https://sh.rustup.rs -sSf | sh" >&2
        exit 1
    fi
    echo "== installing nanochat and building rustbpe"
    "$VENV/bin/pip" install --upgrade pip >/dev/null
    "$VENV/bin/pip" install -e .
fi
PY="$VENV/bin/python"
TORCHRUN="$VENV/bin/torchrun"

# ------------------------------------------------------------------------------------------------
# profile
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
PROFILE="${NANOCHAT_PROFILE:-auto}"
# base_train's architecture additions (gpt.py), every profile: issue 22's but resid_mix and the rope base, which
# measured worse (bench/README.md, equal FLOPs vs the 2026 recipe alone: this set -0.032 val bpb at d4, -0.037 at
# d6, 3 seeds each; with a rope base of 100,000 too -0.030 at d4; resid_mix added back: +0.004). export_hf
# refuses such a model: NANOCHAT_EXPORTABLE=1 trains without them
ARCH_FLAGS=(--value-embeds --smear --backout --qk-scale 1.2 --window-pattern SSSL)
if [ "$PROFILE" = auto ]; then
    if [ "$GPUS" -gt 0 ]; then PROFILE=full; else PROFILE=tiny; fi
fi
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"
RUN="${WANDB_RUN:-}"
echo "== profile: $PROFILE ($GPUS GPUs, $NPROC processes per node), artifacts in $NANOCHAT_BASE_DIR"

if [ "$PROFILE" = full ]; then
    # the batch, LRs and horizon from the model size (base_train's 2026 rules: -1 = 2^20 tokens at d20, 10.5 tokens
    # per scaling parameter); `python -m scripts.base_train --depth 20 --dry-run --assume-device h100` prints them
    DEPTH=20; SEQ=2048; VOCAB=32768; TOK_CHARS=2000000000; DEVICE_BATCH="${NANOCHAT_DEVICE_BATCH:-32}"; TOTAL_BATCH=-1
    MID_BATCH=524288  # midtraining's own batch (as before the batch rule)
    BASE_FLAGS=(--compile)
    EVAL_TOKENS=$((20 * 524288)); CORE_MAX_PER_TASK=-1
    BASE_FORMAT_FLAGS=(--max-problems 200)
    MID_FLAGS=(); CHAT_EVAL_FLAGS=()
    # SFT: 16 packed rows of 2,049 tokens a step (~32k tokens, the work of the 32 padded conversations it took before)
    SFT_FLAGS=(--device-batch-size 2 --rows-per-step 16); RL_FLAGS=(--device-batch-size 8); RL_EVAL_FLAGS=(--num-samples 1)
    RL="${NANOCHAT_RL:-0}"   # RL adds ~1.5 h on 8xH100 for a few points of GSM8K: opt in with NANOCHAT_RL=1
elif [ "$PROFILE" = tiny ]; then
    # sized for ~20 minutes on 2 CPU cores (bench/README.md has the measured times per stage). Rows of 512
    # tokens: nearly every SFT conversation fits whole (the few longer ones are dropped, never cut).
    DEPTH=4; SEQ=512; VOCAB=4096; TOK_CHARS=20000000; DEVICE_BATCH="${NANOCHAT_DEVICE_BATCH:-8}"; TOTAL_BATCH=4096
    BASE_FLAGS=(--num-iterations 200 --head-dim 64 --eval-every 50 --sample-every 200 --save-every 50)
    EVAL_TOKENS=$((16 * 4096)); CORE_MAX_PER_TASK=60
    BASE_FORMAT_FLAGS=(--max-problems 30 --max-new-tokens 256)
    MID_FLAGS=(--num-iterations 120 --eval-every 40); CHAT_EVAL_FLAGS=(--max-problems 50 --max-new-tokens 256)
    SFT_FLAGS=(--device-batch-size 8 --rows-per-step 8 --num-iterations 150 --eval-every 50 --eval-steps 8
               --eval-metrics-every -1 --eval-problems 20)
    RL_FLAGS=(--prompts-per-step 4 --num-samples 4 --max-new-tokens 192 --num-iterations 20 --eval-every -1
              --eval-problems 20 --eval-samples 2 --save-every 10)
    RL_EVAL_FLAGS=(--max-problems 50 --max-new-tokens 256)
    RL="${NANOCHAT_RL:-1}"
elif [ "$PROFILE" = mini ]; then
    # the tiny profile's stages at a few steps each: checks that everything runs (the end-to-end test)
    DEPTH=2; SEQ=128; VOCAB=1024; TOK_CHARS=2000000; DEVICE_BATCH=8; TOTAL_BATCH=1024
    BASE_FLAGS=(--num-iterations 12 --head-dim 64 --eval-every 6 --sample-every 12 --save-every 6)
    EVAL_TOKENS=2048; CORE_MAX_PER_TASK=4; BASE_FORMAT_FLAGS=(--max-problems 2 --max-new-tokens 16)
    MID_FLAGS=(--num-iterations 4 --eval-every 2); CHAT_EVAL_FLAGS=(--max-problems 4 --max-new-tokens 24)
    SFT_FLAGS=(--device-batch-size 4 --rows-per-step 8 --num-iterations 4 --eval-every 2 --eval-steps 2
               --eval-metrics-every -1 --eval-problems 2 --max-new-tokens 16)
    RL_FLAGS=(--prompts-per-step 2 --num-samples 2 --max-new-tokens 16 --num-iterations 2 --eval-every -1
              --eval-problems 2 --eval-samples 2 --save-every -1)
    RL_EVAL_FLAGS=(--max-problems 4 --max-new-tokens 24)
    RL="${NANOCHAT_RL:-1}"
else
    echo "error: NANOCHAT_PROFILE must be auto, tiny, mini or full (got '$PROFILE')" >&2
    exit 1
fi
if [ "${NANOCHAT_EXPORTABLE:-0}" != 1 ]; then BASE_FLAGS+=("${ARCH_FLAGS[@]}"); fi

# stage NAME CMD...: runs CMD unless NAME completed before with the same command; names the
# stage when it fails
stage() {
    local name="$1"; shift
    local marker="$DONE_DIR/$name"
    local signature="$*"
    signature="${signature// --resume/}"  # a resumed run completes the same stage
    if [ -f "$marker" ] && [ "$(cat "$marker")" = "$signature" ]; then
        echo "== $name: already complete, skipping (delete $marker to redo)"
        return 0
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    if ! "$@"; then
        echo "error: stage '$name' failed (command: $*)" >&2
        exit 1
    fi
    echo "$signature" > "$marker"
    echo "== $name: done in $((SECONDS - t0)) s"
}

# a training stage resumes when its checkpoint folder exists but the stage is not complete
resume_flag() {
    local dir="$1" name="$2"
    if [ -d "$dir" ] && ls "$dir"/meta_*.json >/dev/null 2>&1 && [ ! -f "$DONE_DIR/$name" ]; then
        echo "--resume"
    fi
}

launch() {
    if [ "$NPROC" -gt 1 ]; then
        "$TORCHRUN" ${TORCHRUN_ARGS:---standalone} --nproc_per_node="$NPROC" -m "$@"
    else
        "$PY" -m "$@"
    fi
}

# ------------------------------------------------------------------------------------------------
# data: shards from a URL (the hub or a mirror), or built from local text; else stop right away
if [ ! -f "$DONE_DIR/report-reset" ]; then
    "$PY" -m nanochat.report reset
    echo "reset" > "$DONE_DIR/report-reset"
fi
# shards for the tokenizer's text first; the number the base run needs is computed from the model
# size and token budget (base_train --dry-run: tokens x chars/token / chars per shard, +10%) and
# downloads in the background while the tokenizer trains, topped up once the tokenizer can measure
# its real chars/token
FIRST_SHARDS=$(( (TOK_CHARS + 249999999) / 250000000 ))
shards_needed() {
    "$PY" -m scripts.base_train --depth "$DEPTH" --max-seq-len "$SEQ" --device-batch-size "$DEVICE_BATCH" \
        --total-batch-size "$TOTAL_BATCH" "${BASE_FLAGS[@]}" --dry-run 2>/dev/null \
        | sed -n 's/^train shards needed: \([0-9]*\).*/\1/p'
}
SHARD_PID=""
DOWNLOAD=0
if [ -n "${NANOCHAT_DATA_URL:-}" ]; then
    DOWNLOAD=1
elif [ -n "${NANOCHAT_LOCAL_DATA:-}" ]; then
    if [ ! -d "$NANOCHAT_LOCAL_DATA/pretrain" ]; then
        echo "error: NANOCHAT_LOCAL_DATA=$NANOCHAT_LOCAL_DATA has no pretrain/ folder of text to build shards from" >&2
        exit 1
    fi
    stage data-prepare "$PY" -m nanochat.dataset prepare --input "$NANOCHAT_LOCAL_DATA/pretrain" --shard-chars 20000000
elif "$PY" -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=10)" 2>/dev/null; then
    DOWNLOAD=1
else
    cat >&2 <<'EOF'
error: no pretraining data reachable. Either
  - connect to the internet (shards come from the HuggingFace hub), or
  - set NANOCHAT_DATA_URL to a mirror of the shards (https://..., http://127.0.0.1:PORT, file:///path), or
  - set NANOCHAT_LOCAL_DATA to a folder with a pretrain/ subfolder of .txt/.txt.gz/.jsonl/.parquet text
    (on the development machine: NANOCHAT_LOCAL_DATA=../shared/data)
EOF
    exit 1
fi
if [ "$DOWNLOAD" = 1 ]; then
    stage data-first "$PY" -m nanochat.dataset -n "$FIRST_SHARDS"
    NEED=$(shards_needed)
    echo "== data: the base run needs ${NEED:-?} train shards (estimate before the tokenizer exists)"
    if [ -n "$NEED" ] && [ "$NEED" -gt "$FIRST_SHARDS" ]; then
        "$PY" -m nanochat.dataset -n "$NEED" > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
        SHARD_PID=$!
    fi
fi

# ------------------------------------------------------------------------------------------------
# tokenizer
stage tok-train "$PY" -m scripts.tok_train --vocab-size "$VOCAB" --max-chars "$TOK_CHARS"
stage tok-eval "$PY" -m scripts.tok_eval

if [ -n "$SHARD_PID" ]; then
    echo "== waiting for the shard download to finish (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$SHARD_PID" || { echo "error: stage 'data-rest' failed; see $NANOCHAT_BASE_DIR/download.log" >&2; exit 1; }
fi
if [ "$DOWNLOAD" = 1 ]; then
    NEED=$(shards_needed)  # now with the tokenizer's measured chars/token
    [ -n "$NEED" ] || { echo "error: could not compute the number of shards (run the base_train --dry-run by hand)" >&2; exit 1; }
    stage data-rest "$PY" -m nanochat.dataset -n "$NEED"
fi

# ------------------------------------------------------------------------------------------------
# base model
TAG="d$DEPTH"
BASE_DIR_CKPT="$NANOCHAT_BASE_DIR/base_checkpoints/$TAG"
RESUME=$(resume_flag "$BASE_DIR_CKPT" base-train)
stage base-train launch scripts.base_train --depth "$DEPTH" --max-seq-len "$SEQ" \
    --device-batch-size "$DEVICE_BATCH" --total-batch-size "$TOTAL_BATCH" --eval-tokens "$EVAL_TOKENS" \
    --model-tag "$TAG" ${RUN:+--run "$RUN"} "${BASE_FLAGS[@]}" $RESUME
stage base-loss launch scripts.base_loss --model-tag "$TAG" --device-batch-size "$DEVICE_BATCH" \
    --split-tokens "$EVAL_TOKENS"
stage base-eval launch scripts.base_eval --model-tag "$TAG" --max-per-task "$CORE_MAX_PER_TASK"
# the base model on GSM8K: its share of answers in the '#### <number>' format is the baseline SFT must beat
stage base-gsm8k launch scripts.chat_eval -i base --model-tag "$TAG" -a GSM8K "${BASE_FORMAT_FLAGS[@]}"

# ------------------------------------------------------------------------------------------------
# midtraining (chat format, tool use, multiple choice) and its chat evaluation
RESUME=$(resume_flag "$NANOCHAT_BASE_DIR/mid_checkpoints/$TAG" mid-train)
stage mid-train launch scripts.mid_train --model-tag "$TAG" --device-batch-size "$DEVICE_BATCH" \
    --total-batch-size "${MID_BATCH:-$TOTAL_BATCH}" --eval-tokens "$EVAL_TOKENS" ${RUN:+--run "$RUN-mid"} "${MID_FLAGS[@]}" $RESUME
stage mid-eval launch scripts.chat_eval -i mid --model-tag "$TAG" "${CHAT_EVAL_FLAGS[@]}"

# ------------------------------------------------------------------------------------------------
# supervised fine-tuning and its chat evaluation
RESUME=$(resume_flag "$NANOCHAT_BASE_DIR/chatsft_checkpoints/$TAG" sft-train)
stage sft-train launch scripts.chat_sft --model-tag "$TAG" ${RUN:+--run "$RUN-sft"} "${SFT_FLAGS[@]}" $RESUME
stage sft-eval launch scripts.chat_eval -i sft --model-tag "$TAG" "${CHAT_EVAL_FLAGS[@]}"

# ------------------------------------------------------------------------------------------------
# reinforcement learning on GSM8K (NANOCHAT_RL=0 skips it) and its GSM8K evaluation
if [ "$RL" = 1 ]; then
    RESUME=$(resume_flag "$NANOCHAT_BASE_DIR/chatrl_checkpoints/$TAG" rl-train)
    stage rl-train launch scripts.chat_rl --model-tag "$TAG" ${RUN:+--run "$RUN-rl"} "${RL_FLAGS[@]}" $RESUME
    stage rl-eval launch scripts.chat_eval -i rl --model-tag "$TAG" -a GSM8K "${RL_EVAL_FLAGS[@]}"
fi

# ------------------------------------------------------------------------------------------------
# report card
"$PY" -m nanochat.report generate
echo "== done: $NANOCHAT_BASE_DIR/report/report.md"
