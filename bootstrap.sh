#!/usr/bin/env bash
# One command from a fresh Debian machine with Python 3.11:
#   ./bootstrap.sh run    set up, then run the main job (edgecl run)
#   ./bootstrap.sh test   set up, then run the whole test suite
# Set-up is idempotent: system packages, .venv at the repository root, Python packages.
# pip runs with -qq: errors only (this machine's pip configuration names wheel folders that may be
# absent, and pip warns about each; setuptools warns about every editable install).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
STAMP=.venv/.edgecl-installed

need_apt=()
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist) for the larger benchmarks.
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== apt-get install ${need_apt[*]}"
    apt_log=$(mktemp)  # apt's notes (debconf without apt-utils) are shown only if the install fails
    apt-get update -qq >"$apt_log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >>"$apt_log" 2>&1 || \
      { cat "$apt_log" >&2; echo "warning: could not install ${need_apt[*]}; tests needing them will say so"; }
    rm -f "$apt_log"
  else
    echo "note: not root or no apt-get; skipped system packages: ${need_apt[*]}"
  fi
fi

[ -x .venv/bin/python ] || { echo "== creating .venv"; "$PYTHON" -m venv .venv; }
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ bootstrap.sh -nt "$STAMP" ]; then
  echo "== installing packages into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -qq --upgrade pip
  # torch first and pinned: the CPU build; an open range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -qq torch==2.13.0
  .venv/bin/python -m pip install -qq -e '.[dev]'
  touch "$STAMP"
fi

# A second, runtime-only environment: what a board installs, used by the tests to show that the
# portable graphs and the agent run there too. It gets the package's own dependencies (pyproject.toml)
# with their markers evaluated as on an aarch64 board: evaluated here, on x86-64, they pick
# onnxruntime-training-cpu, which no board has (an extra cannot take a dependency away); so stock
# onnxruntime, numpy, pyserial and tqdm, as `pip install edgecl-*.whl` gives a board.
if [ "${1:-run}" = test ] && { [ ! -f .venv-stock-ort/.ok ] || [ pyproject.toml -nt .venv-stock-ort/.ok ] || \
                               [ bootstrap.sh -nt .venv-stock-ort/.ok ]; }; then
  echo "== creating .venv-stock-ort (the package's dependencies as on an aarch64 board: stock onnxruntime, no torch)"
  "$PYTHON" -m venv --clear .venv-stock-ort
  .venv-stock-ort/bin/python -m pip install -qq packaging
  mapfile -t board_reqs < <(.venv-stock-ort/bin/python -c '
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement
env = {**default_environment(), "platform_machine": "aarch64"}
with open("pyproject.toml", "rb") as f:
    for dep in tomllib.load(f)["project"]["dependencies"]:
        req = Requirement(dep)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            print(req)')
  .venv-stock-ort/bin/python -m pip install -qq "${board_reqs[@]}"
  .venv-stock-ort/bin/python -m pip install -qq --no-deps -e .  # its dependencies: the ones just installed
  touch .venv-stock-ort/.ok
fi

# The emulated aarch64 board of the tests (.ci/arm.sh: Debian arm64 root fs, qemu-user-static,
# stock onnxruntime; cached in ~/.cache/edgecl-arm, ~1-2 min the first time):
# tests/devices/test_agent_arm.py runs the device agent on it.
if [ "${1:-run}" = test ]; then
  if [ "$(id -u)" = 0 ] && [ "$(uname -m)" = x86_64 ] && command -v apt-get >/dev/null; then
    .ci/arm.sh setup || echo "warning: emulated aarch64 set-up failed; tests/devices/test_agent_arm.py will say so"
  else
    echo "note: not root on x86-64 Debian; skipped the emulated aarch64 set-up (.ci/arm.sh setup)"
  fi
fi

export OMP_WAIT_POLICY=PASSIVE
case "${1:-run}" in
  run)  shift || true; exec .venv/bin/edgecl run "$@" ;;
  test) shift || true; exec .venv/bin/python -m pytest "$@" ;;
  *)    echo "usage: ./bootstrap.sh run|test [args]" >&2; exit 2 ;;
esac
