#!/usr/bin/env bash
# One command on a fresh Debian/Ubuntu machine: everything `python -m bench` needs.
#
#   bench/bootstrap.sh            # install what is missing, then say what was installed
#   bench/bootstrap.sh --run      # ... and run the quick suite into bench/results
#
# Installs, only when missing: wrk, nginx, redis-server and valgrind (apt-get; valgrind for
# the full run's instruction counts), LiteLLM's proxy in
# its own venv at /opt/litellm-venv (LITELLM_VENV overrides), and this project with its
# `bench` extra into .venv at the repository root (PYTHON overrides the interpreter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LITELLM_VENV="${LITELLM_VENV:-/opt/litellm-venv}"
PYTHON="${PYTHON:-python3}"
installed=()
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then sudo_cmd=(sudo); fi

missing=()
for tool in wrk nginx redis-server valgrind; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
        missing+=("$tool")
    fi
done
if [ ${#missing[@]} -gt 0 ]; then
    "${sudo_cmd[@]}" apt-get update -q
    "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    installed+=("apt: ${missing[*]}")
fi

if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    "${sudo_cmd[@]}" "$PYTHON" -m venv "$LITELLM_VENV"
    "${sudo_cmd[@]}" "$LITELLM_VENV/bin/pip" install -q 'litellm[proxy]'
    installed+=("LiteLLM $("$LITELLM_VENV/bin/pip" show litellm | sed -n 's/^Version: //p') in $LITELLM_VENV")
fi

if [ ! -x "$ROOT/.venv/bin/python" ]; then
    "$PYTHON" -m venv "$ROOT/.venv"
    installed+=("venv $ROOT/.venv")
fi
if ! "$ROOT/.venv/bin/python" -c "import llmkit, matplotlib, redis, httpx, openai" 2>/dev/null; then
    "$ROOT/.venv/bin/pip" install -q -e "$ROOT[dev,bench]"
    (cd "$ROOT" && .venv/bin/python setup.py build_ext --inplace -q)
    installed+=("llmkit[dev,bench] (editable) in $ROOT/.venv")
fi

if [ ${#installed[@]} -eq 0 ]; then
    echo "bootstrap: everything was already installed"
else
    echo "bootstrap: installed:"
    printf '  - %s\n' "${installed[@]}"
fi
echo "run: cd $ROOT && . .venv/bin/activate && python -m bench --quick --out bench/results"

if [ "${1:-}" = "--run" ]; then
    cd "$ROOT"
    .venv/bin/python -m bench --quick --out bench/results
    .venv/bin/python bench/readme_section.py bench/results/report.json
fi
