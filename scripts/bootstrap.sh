#!/usr/bin/env bash
# Creates or refreshes the project's virtual environment in <repo>/.venv (Python 3.12), idempotently.
#
# Python 3.12 is looked for in this order: $PYTHON; `python3.12` on PATH (if it actually runs); pyenv's 3.12.*
# versions. The environment is (re)installed with `pip install -c constraints.txt -e ".[$EXTRAS]"` only when
# pyproject.toml, constraints.txt, EXTRAS or the repo location changed since the last successful install
# (.venv/.bootstrap-stamp). EXTRAS: optional dependency groups of pyproject.toml, comma-separated (default "test"; CI
# uses "test,launch" for the XManager launcher). Safe to run any number of times, from any directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.bootstrap-stamp"
EXTRAS="${EXTRAS:-test}"

say() { echo "[bootstrap] $*"; }
die() { echo "[bootstrap] error: $*" >&2; exit 1; }

is_py312() {  # true when "$1" runs and is CPython 3.12
    [ -n "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 12) else 1)' >/dev/null 2>&1
}

find_python() {
    if [ -n "${PYTHON:-}" ]; then
        is_py312 "$PYTHON" || die "\$PYTHON=$PYTHON is not a working Python 3.12"
        echo "$PYTHON"; return
    fi
    if command -v python3.12 >/dev/null 2>&1 && is_py312 python3.12; then
        command -v python3.12; return
    fi
    local roots=() candidate
    if command -v pyenv >/dev/null 2>&1; then
        roots+=("$(pyenv root 2>/dev/null || true)")
    fi
    roots+=("${PYENV_ROOT:-}" "$HOME/.pyenv")
    for root in "${roots[@]}"; do
        [ -n "$root" ] || continue
        # Newest 3.12.x first.
        for candidate in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -V -r); do
            if is_py312 "$candidate/bin/python3.12"; then
                echo "$candidate/bin/python3.12"; return
            fi
        done
    done
    die "Python 3.12 not found. Install it (e.g. 'pyenv install 3.12', or your OS package 'python3.12' with its
venv module: 'apt-get install python3.12 python3.12-venv'), or point \$PYTHON at a python3.12 binary."
}

want_hash() {
    { cat pyproject.toml constraints.txt; echo "$ROOT"; echo "extras=$EXTRAS"; } | sha256sum | cut -d' ' -f1
}

[[ "$EXTRAS" =~ ^[a-z][a-z0-9_-]*(,[a-z][a-z0-9_-]*)*$ ]] ||
    die "EXTRAS=$EXTRAS: expected comma-separated optional dependency groups of pyproject.toml, e.g. test,launch"

# 1. A .venv whose python is 3.12.
if [ -x "$VENV/bin/python" ] && is_py312 "$VENV/bin/python"; then
    :
else
    PY="$(find_python)"
    if [ -e "$VENV" ]; then
        say "existing .venv is not Python 3.12; recreating it"
        rm -rf "$VENV"
    fi
    say "creating .venv with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV" || die "'$PY -m venv' failed (on Debian/Ubuntu: apt-get install python3.12-venv)"
fi

# 2. Dependencies, only when the inputs changed.
HASH="$(want_hash)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    say "environment up to date ($VENV)"
    exit 0
fi
say "installing decmem-jax[$EXTRAS] with pinned versions from constraints.txt (first time: several minutes, ~3 GB)"
start=$SECONDS
rm -f "$STAMP"
PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/python" -m pip install --quiet --progress-bar off --no-input \
    -c constraints.txt -e ".[$EXTRAS]"
"$VENV/bin/python" -c 'import jax, flax, decmem_jax; print(f"[bootstrap] ok: jax {jax.__version__}, flax {flax.__version__}")'
echo "$HASH" > "$STAMP"
say "done in $((SECONDS - start)) s"
