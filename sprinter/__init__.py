"""sprinter: speculative decoding with trained acceptance verifiers."""

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so `import sprinter.files` or `sprinter.errors` does not import
# torch and transformers: scripts/gpu_run.py's driver stays light and its time goes to the stages.
_EXPORTS = {"Decoder": "sprinter.decode.decoder", "DecodeOptions": "sprinter.decode.options",
            "GenerateOutput": "sprinter.decode.decoder",
            "SprinterError": "sprinter.errors", "Pair": "sprinter.pairs.load", "load_pair": "sprinter.pairs.load"}

__all__ = ["DecodeOptions", "Decoder", "GenerateOutput", "Pair", "SprinterError", "__version__", "load_pair"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sprinter' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
