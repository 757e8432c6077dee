# Source me: creates (or refreshes) .venv with the project and its test dependencies.
# TORCH_SPEC picks the torch build; the default is the CPU wheel this project is tested with.
# On a GPU machine: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" (example).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${KALM_VENV:-.venv}"
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "==> creating $VENV (torch first, then the project with its dev extra)"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
export TOKENIZERS_PARALLELISM=false
