#!/usr/bin/env bash
# Groove setup: creates .venv at the repo root and installs Groove with its dependencies.
# Idempotent: a second run only checks. Flags:
#   --smoke          then run `groove demo` (relay + 2 nodes + a checked generation)
#   --test           then run the test suite (installing Debian's chromium for the browser test when it can)
#   --status [RELAY] then show a relay's nodes and coverage (default 127.0.0.1:8770)
#   --info MODEL     then show a model's layers, sizes and recommended splits
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="2.13.0"
VENV=.venv

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: Groove needs Python 3.11 or newer ($PYTHON is $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    # A torch the user installed for their GPU (CUDA, ROCm) in this Python is reused, not replaced.
    if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
        echo "setup: reusing the torch installed in $PYTHON"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "setup: installing torch $TORCH_CPU_VERSION (CPU build); install your CUDA/MPS torch into $VENV first to use a GPU"
    "${PIP[@]}" install "torch==$TORCH_CPU_VERSION"
fi

stamp="$VENV/.groove-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! "$PY" -c 'import groove, pytest' >/dev/null 2>&1; then
    echo "setup: installing groove and its dependencies into $VENV"
    "${PIP[@]}" install -e ".[test]"
    touch "$stamp"
fi
echo "setup: ready ($("$PY" -c 'import torch, transformers, groove; print(f"groove {groove.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")'))"
echo "setup: activate with 'source $VENV/bin/activate', or run '$VENV/bin/groove'"

case "${1:-}" in
    "") ;;
    --smoke) exec "$VENV/bin/groove" demo ;;
    --test)
        shift
        # The status page test drives headless Chromium; install it where we can (Debian,
        # as root), otherwise that one test is skipped and says why.
        if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "setup: installing Debian's chromium for the status page test"
            (timeout 600 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq chromium) >/dev/null 2>&1 \
                || echo "setup: could not install chromium; the browser test will be skipped"
        fi
        exec "$PY" -m pytest "$@" ;;
    --status) exec "$VENV/bin/groove" status --relay "${2:-127.0.0.1:8770}" ;;
    --info)
        if [ -z "${2:-}" ]; then echo "error: --info needs a MODEL (a checkpoint directory or hub id)" >&2; exit 2; fi
        exec "$VENV/bin/groove" info "$2" ;;
    *) echo "error: unknown flag $1 (use --smoke, --test, --status [RELAY] or --info MODEL)" >&2; exit 2 ;;
esac
