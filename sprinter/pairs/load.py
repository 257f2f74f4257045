"""Loading a draft/target pair: by Hub name or local path, on a device and dtype, sharing a vocabulary."""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from sprinter.errors import SprinterError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
PROBE_TEXT = "def probe(x):\n    return x * 2  # The quick brown fox, 1234 ünïcödé."


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' is CUDA when present, else CPU; asking for CUDA where there is none is an error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise SprinterError(f"device: got {name!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SprinterError(f"device: got {name!r} but this machine has no CUDA device; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SprinterError(f"device: got {name!r}; this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise SprinterError(f"device: got {name!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SprinterError(f"dtype: got {dtype!r}; expected one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def _not_found(role: str, name: str, err: Exception) -> SprinterError:
    hint = "" if Path(name).exists() else (
        "; it is not a local folder and not in the Hugging Face cache (offline machine?): download it where a "
        "network exists, or pass a local path such as checkpoints/pairs/demo/" + role)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SprinterError(f"could not load the {role} {name!r}{hint} ({first})")


def local_dir(name_or_path: str) -> Path | None:
    """The folder holding a model's files: the path itself, or its Hub cache snapshot (no download)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:  # not cached, or not a repo id: there is nothing local to fingerprint
        return None


def fingerprint(name_or_path: str) -> str:
    """A short hash of a model's config and weight files (sizes and first MiB): the same for any dtype
    it is loaded in, different when the weights change. Used to tie verifiers and data to their draft."""
    folder = local_dir(name_or_path)
    if folder is None:
        return "unknown"
    digest = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        if file.name == "config.json" or file.suffix in (".safetensors", ".bin"):
            digest.update(file.name.encode())
            digest.update(str(file.stat().st_size).encode())
            with file.open("rb") as fh:
                digest.update(fh.read(1 << 20))
    return digest.hexdigest()[:16]


def check_model_folder(name_or_path: str, role: str) -> None:
    """A local folder must hold a model (its config.json): an empty or wrong folder is named as such, not
    through the tokenizer's or the weights' loader's complaint about a file deep inside it."""
    path = Path(name_or_path)
    model = role in ("draft", "target")  # a tokenizer alone may come without the model's config.json
    needs = ("config.json",) if model else ("config.json", "tokenizer_config.json", "tokenizer.json")
    if path.is_dir() and not any((path / name).is_file() for name in needs):
        raise SprinterError(f"{role}: {name_or_path!r} is a folder without a {'model' if model else 'tokenizer'} "
                            f"(no {' or '.join(needs)}); expected a model folder (config.json, weights, tokenizer "
                            f"files), e.g. checkpoints/pairs/demo/{role if model else 'target'}")


def load_tokenizer(name_or_path: str, role: str = "target", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_folder(name_or_path, role)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(role, name_or_path, err) from None


def load_model(name_or_path: str, role: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False):
    """A causal LM in eval mode on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    check_model_folder(name_or_path, role)
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise _not_found(role, name_or_path, err) from None
    return model.to(device).eval()


@functools.cache
def cache_keyword(model_class: type) -> str:
    """The keyword a causal LM's forward takes its KV cache by: `cache` from the transformers releases that
    renamed it (5.24 warns that `past_key_values` goes in 5.40), `past_key_values` before (the GPU image's 5.17).
    Read once per model class from the forward's signature (the deprecation shim keeps the new signature)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def run_with_cache(model: torch.nn.Module, cache, **inputs):
    """`model(**inputs)` reading and extending `cache`: the one place that names the cache keyword, so every
    model call with a cache works on every transformers 5.x release."""
    return model(**inputs, **{cache_keyword(type(model)): cache}, use_cache=True)


def cache_argument(kwargs: dict):
    """The cache among a forward's keyword arguments (for hooks that watch a loop that is not ours), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def check_same_vocabulary(draft_tok, target_tok, draft_name: str, target_name: str) -> None:
    """Draft and target must tokenize alike, or p and q are over different token sets."""
    if len(draft_tok) != len(target_tok):
        raise SprinterError(f"draft {draft_name!r} and target {target_name!r} have different vocabularies: "
                            f"{len(draft_tok)} vs {len(target_tok)} tokens; expected the same tokenizer")
    a, b = draft_tok(PROBE_TEXT)["input_ids"], target_tok(PROBE_TEXT)["input_ids"]
    if a != b:
        raise SprinterError(f"draft {draft_name!r} and target {target_name!r} tokenize a probe text differently "
                            f"({a[:8]}... vs {b[:8]}...); expected the same tokenizer")


@dataclass
class Pair:
    """A draft and a target that share `tokenizer`; logits are compared over the first `vocab_size` ids."""

    draft: torch.nn.Module
    target: torch.nn.Module
    tokenizer: object
    draft_name: str
    target_name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def vocab_size(self) -> int:
        # Some families pad their embedding matrices differently (Qwen 0.5B vs 7B): compare the shared ids.
        return min(len(self.tokenizer), self.draft.config.vocab_size, self.target.config.vocab_size)

    @property
    def max_length(self) -> int:
        """The shorter context window of the two models."""
        def window(model) -> int:
            cfg = model.config
            return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 1 << 30)

        return min(window(self.draft), window(self.target))


def load_pair(draft: str, target: str, device: str | torch.device = "auto", dtype: str | torch.dtype = "auto",
              trust_remote_code: bool = False) -> Pair:
    """Load a draft/target pair by Hub name or local path; fails clearly if they do not share a vocabulary."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_model_folder(draft, "draft")
    check_model_folder(target, "target")
    target_tok = load_tokenizer(target, "target", trust_remote_code)
    draft_tok = load_tokenizer(draft, "draft", trust_remote_code)
    check_same_vocabulary(draft_tok, target_tok, draft, target)
    return Pair(draft=load_model(draft, "draft", dev, dt, trust_remote_code),
                target=load_model(target, "target", dev, dt, trust_remote_code),
                tokenizer=target_tok, draft_name=draft, target_name=target, device=dev, dtype=dt)
