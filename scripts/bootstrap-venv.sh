#!/usr/bin/env bash
# Create .venv with a Python >= 3.12 and install the project into it (editable, with the test,
# benchmark and doc extras).
# Looks for an interpreter on PATH first, then through pyenv. Re-installs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.installed"

is_supported() {  # is_supported PYTHON -> exit 0 if it runs and is >= 3.12
  "$1" -c 'import sys; raise SystemExit(sys.version_info < (3, 12))' >/dev/null 2>&1
}

find_python() {
  local candidate
  for candidate in python3.13 python3.12 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && is_supported "$candidate"; then
      command -v "$candidate"
      return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local version path
    for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9]|[2-9][0-9])(\.[0-9]+)?$' | sort -rV); do
      path=$(PYENV_VERSION="$version" pyenv which python3 2>/dev/null || true)
      if [ -n "$path" ] && is_supported "$path"; then
        echo "$path"
        return 0
      fi
    done
  fi
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_supported "$VENV/bin/python"; then
  PYTHON=$(find_python) || {
    echo "error: no Python >= 3.12 found on PATH or through pyenv. Install one (e.g. 'pyenv install 3.12') and retry." >&2
    exit 1
  }
  echo "Creating $VENV with $PYTHON"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
fi

if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e ".[test,benchmark,doc]"
  touch "$STAMP"
fi
