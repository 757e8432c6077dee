# Source me: creates (or refreshes) .venv with the project and its test dependencies.
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is tested with.
# On a GPU machine: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" (example).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${KALM_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$PWD/$VENV" ;; esac
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # A first install takes minutes (torch alone is ~200 MB): one line per step, pip's detail kept quiet.
  echo "==> [1/4] creating $VENV"
  python3 -m venv "$VENV"
  echo "==> [2/4] upgrading pip"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  echo "==> [3/4] installing ${TORCH_SPEC:-torch==2.13.0} (the largest download)"
  "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  echo "==> [4/4] installing the project with its dev extra (pip install -e \".[dev]\")"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
  echo "==> $VENV ready"
fi
export PATH="$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
