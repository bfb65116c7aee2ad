#!/usr/bin/env bash
# The test command (README Quick start): make or reuse the venv, install the project (this builds
# the rustbpe extension from rustbpe/ with maturin), run the Rust unit tests, then the Python suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${NANOCHAT_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
    python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "nanochat needs Python >= 3.10")'
    python3 -m venv "$VENV"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) to build rustbpe" >&2; exit 1; }
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[dev]'

echo "== cargo test (rustbpe core)"
(cd rustbpe && cargo test --release --quiet)

echo "== pytest"
# pytest exits 5 when it collects nothing; with `set -e` that (like any failure) fails this script.
"$VENV/bin/python" -m pytest tests -q "$@"
