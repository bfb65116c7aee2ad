#!/usr/bin/env bash
# The whole pipeline, one command:   bash speedrun.sh
#
# On a GPU node it trains the full-size model with torchrun on every GPU it finds; without a GPU
# (or with NANOCHAT_PROFILE=tiny) it runs the same stages at a size a laptop CPU finishes quickly.
#
# Environment:
#   NANOCHAT_PROFILE    auto (default: full with GPUs, else tiny) | tiny | full
#   NANOCHAT_BASE_DIR   where every artifact goes (default ~/.cache/nanochat)
#   NANOCHAT_DATA_URL   base URL of the pretraining shards (https://, http://127.0.0.1:..., file://)
#   NANOCHAT_LOCAL_DATA a folder laid out like shared/data; its pretrain/ text becomes the shards
#   NANOCHAT_VENV       the virtual environment to create/use (default .venv)
#   WANDB_RUN           log to wandb under this run name (unset: no wandb)
#   NANOCHAT_RL         1: run the RL stage (default on the tiny profile), 0: skip it (default on full)
#   NPROC               processes per node for torchrun (default: the number of GPUs)
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
if [ "$PROFILE" = auto ]; then
    if [ "$GPUS" -gt 0 ]; then PROFILE=full; else PROFILE=tiny; fi
fi
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"
RUN="${WANDB_RUN:-}"
echo "== profile: $PROFILE ($GPUS GPUs, $NPROC processes per node), artifacts in $NANOCHAT_BASE_DIR"

if [ "$PROFILE" = full ]; then
    DEPTH=20; SEQ=2048; VOCAB=32768; TOK_CHARS=2000000000; DEVICE_BATCH=32; TOTAL_BATCH=524288
    FIRST_SHARDS=8; BASE_FLAGS=(--target-param-data-ratio 20)
    EVAL_TOKENS=$((20 * 524288)); CORE_MAX_PER_TASK=-1
    MID_FLAGS=(); CHAT_EVAL_FLAGS=()
    SFT_FLAGS=(--device-batch-size 4); RL_FLAGS=(--device-batch-size 8); RL_EVAL_FLAGS=(--num-samples 1)
    RL="${NANOCHAT_RL:-0}"   # RL adds ~1.5 h on 8xH100 for a few points of GSM8K: opt in with NANOCHAT_RL=1
elif [ "$PROFILE" = tiny ]; then
    DEPTH=4; SEQ=256; VOCAB=4096; TOK_CHARS=20000000; DEVICE_BATCH=16; TOTAL_BATCH=4096
    FIRST_SHARDS=2; BASE_FLAGS=(--num-iterations 300 --head-dim 64 --eval-every 100 --sample-every 300 --save-every 100)
    EVAL_TOKENS=$((32 * 256 * 16)); CORE_MAX_PER_TASK=100
    MID_FLAGS=(--num-iterations 150 --eval-every 50); CHAT_EVAL_FLAGS=(--max-problems 50 --max-new-tokens 256)
    SFT_FLAGS=(--device-batch-size 8 --examples-per-step 16 --num-iterations 150 --eval-every 50 --eval-steps 8
               --eval-metrics-every -1 --eval-problems 20)
    RL_FLAGS=(--prompts-per-step 4 --num-samples 4 --max-new-tokens 128 --num-iterations 20 --eval-every -1
              --eval-problems 20 --eval-samples 2 --save-every -1)
    RL_EVAL_FLAGS=(--max-problems 50 --max-new-tokens 256)
    RL="${NANOCHAT_RL:-1}"
else
    echo "error: NANOCHAT_PROFILE must be auto, tiny or full (got '$PROFILE')" >&2
    exit 1
fi

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
SHARD_PID=""
if [ -n "${NANOCHAT_DATA_URL:-}" ]; then
    stage data-first "$PY" -m nanochat.dataset -n "$FIRST_SHARDS"
elif [ -n "${NANOCHAT_LOCAL_DATA:-}" ]; then
    if [ ! -d "$NANOCHAT_LOCAL_DATA/pretrain" ]; then
        echo "error: NANOCHAT_LOCAL_DATA=$NANOCHAT_LOCAL_DATA has no pretrain/ folder of text to build shards from" >&2
        exit 1
    fi
    stage data-prepare "$PY" -m nanochat.dataset prepare --input "$NANOCHAT_LOCAL_DATA/pretrain" --shard-chars 20000000
elif "$PY" -c "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=10)" 2>/dev/null; then
    stage data-first "$PY" -m nanochat.dataset -n "$FIRST_SHARDS"
    if [ "$PROFILE" = full ]; then
        # the rest of the shards download while the tokenizer trains (~240 shards for d20 at 20 tokens/param)
        "$PY" -m nanochat.dataset -n 240 > "$NANOCHAT_BASE_DIR/download.log" 2>&1 &
        SHARD_PID=$!
    fi
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

# ------------------------------------------------------------------------------------------------
# tokenizer
stage tok-train "$PY" -m scripts.tok_train --vocab-size "$VOCAB" --max-chars "$TOK_CHARS"
stage tok-eval "$PY" -m scripts.tok_eval

if [ -n "$SHARD_PID" ]; then
    echo "== waiting for the shard download to finish (log: $NANOCHAT_BASE_DIR/download.log)"
    wait "$SHARD_PID" || { echo "error: stage 'data-rest' failed; see $NANOCHAT_BASE_DIR/download.log" >&2; exit 1; }
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

# ------------------------------------------------------------------------------------------------
# midtraining (chat format, tool use, multiple choice) and its chat evaluation
RESUME=$(resume_flag "$NANOCHAT_BASE_DIR/mid_checkpoints/$TAG" mid-train)
stage mid-train launch scripts.mid_train --model-tag "$TAG" --device-batch-size "$DEVICE_BATCH" \
    --total-batch-size "$TOTAL_BATCH" --eval-tokens "$EVAL_TOKENS" ${RUN:+--run "$RUN-mid"} "${MID_FLAGS[@]}" $RESUME
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
