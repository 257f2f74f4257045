"""The verifier: a small network that reads the draft's state and predicts P(target accepts the token).

A plain `nn.Module` (the decode path imports this file, never Lightning) with two shapes:
- the token-aware MLP: the draft's last hidden state, a small learned embedding of the drafted token,
  and scalar features (the draft's probability of its token, its entropy, the position), each
  standardised with statistics stored in the module, then `depth` blocks of Linear -> norm -> GELU ->
  dropout and a Linear to one logit;
- the paper's baseline (docs/references.md §1): `features=("hidden",)`, `depth=0`, i.e. Linear(H, 1).
Optional inputs (sprinter.features defines each, for collection and decode alike): the hidden state of the
layer before the last (`hidden_prev_layer`, standardised like `hidden`), the draft's top-k probabilities and
margin, and the block so far (`prev_draft_prob`, `block_cum_prob`). Every feature is named in the
checkpoint's metadata, so a checkpoint made before a feature existed loads and gates as it did.

The checkpoint is one `verifier.safetensors`: the state dict (normalisation statistics included as
buffers) plus string metadata holding everything needed to use it without the training config
(`VerifierInfo`). Loading never unpickles and uses `strict=True`.

A checkpoint is checked before it is trusted (`load_verifier`): every tensor finite and of plausible size,
every standardisation scale positive, the metadata's feature list equal to the one the weights were saved
with (`feature_spec`, a fingerprint stored beside it), thresholds present and in (0, 1). A checkpoint written
by scripts/train.py also holds a probe: a few of its validation rows (`probe.<feature>`) and the logits the
verifier gave them at save time (`probe.logits`); a verifier that no longer gives those logits is refused, and
one that passes or flags every probe row loads with a `SprinterWarning` (docs/decoding.md).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sprinter.errors import SprinterError
from sprinter.features import HIDDEN, HIDDEN_PREV, TOKEN, VECTORS
from sprinter.files import write_atomic

FORMAT = "sprinter-verifier/1"
FILE_NAME = "verifier.safetensors"
NORMS = ("none", "layer", "rms")
# Columns that carry the target's answer: using one as a feature would leak the label.
LEAKY = ("target_prob", "accept_greedy", "accept_sprinter", "accept_soft", "accept_relaxed")
PROBE = "probe."  # the prefix of the probe's tensors (not part of the module's state dict)
PROBE_ROWS = 256  # validation rows kept as the probe: enough to tell "passes everything" from a weak verifier



def budget_key(budget: float) -> str:
    """The key of a false-accept budget in `VerifierInfo.thresholds` and metrics.json: "0.05"."""
    return str(float(budget))

@dataclass
class VerifierInfo:
    """Everything a user of the checkpoint needs besides the weights (stored as safetensors metadata)."""

    features: tuple[str, ...]
    hidden_size: int
    arch: dict[str, Any]  # width, depth, norm, dropout, token_dim, vocab_size
    label_rule: str = "sprinter"  # greedy | sprinter | soft | relaxed: the label the verifier was trained on
    draft: dict[str, str] = field(default_factory=dict)  # {"name", "fingerprint"} from the data manifest
    target: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)  # false-accept budget (as str) -> threshold
    default_budget: float | None = None
    default_threshold: float = 0.5  # a token passes iff sigmoid(logit) >= threshold
    # budget (as str) -> {"pass_rate", "false_accept_share"} on the test split at that budget's threshold: the
    # share of gate decisions that pass, and the share of passed tokens the target would reject. What the
    # decode-time guard compares with (sprinter.decode.stats.check_promise).
    rates: dict[str, dict[str, float]] = field(default_factory=dict)
    context_source: str | None = None  # "corpus" | "decode": how the training contexts were made
    # Decode-time calibration (scripts/calibrate.py): temperature (as str) -> budget (as str) -> threshold, chosen on
    # the verifier's own decode-time rows so that at most that share of passed tokens is rejected by the target;
    # `threshold_for` prefers them to `thresholds` at that temperature. kept_calibration: temperature -> what made
    # them ({data, rows, prompts, bound}).
    kept_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    kept_calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    stop_threshold: float | None = None  # sd-gated: the recommended stop threshold (scripts/benchmark.py
    #                                      --store-stop-threshold writes the fastest one of its sweep here)
    sprinter_version: str = ""

    def __post_init__(self) -> None:
        self.features = tuple(self.features)
        if HIDDEN not in self.features:
            raise SprinterError(f"features: got {list(self.features)}; expected 'hidden' among them")
        leaky = sorted(set(self.features) & set(LEAKY))
        if leaky:
            raise SprinterError(f"features: got {leaky}; these carry the target's answer and cannot be features")

    @property
    def scalar_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.features if f not in (*VECTORS, TOKEN))

    def threshold_for(self, budget: float, temperature: float = 0.0) -> float:
        """The threshold of a false-accept budget at a decode temperature: the decode-time calibration's at that
        temperature when there is one, else the one calibrated on collected rows (KeyError: neither)."""
        key = budget_key(budget)
        kept = self.kept_thresholds.get(budget_key(temperature), {})
        return kept[key] if key in kept else self.thresholds[key]

    def thresholds_at(self, temperature: float = 0.0) -> dict[str, float]:
        """budget (as str) -> the threshold `threshold_for` gives at this temperature, for every budget of either
        calibration."""
        return {budget_key(b): self.threshold_for(b, temperature) for b in self.budgets_at(temperature)}

    def budgets_at(self, temperature: float = 0.0) -> list[float]:
        """The budgets a threshold exists for at this temperature (either calibration)."""
        keys = set(self.thresholds) | set(self.kept_thresholds.get(budget_key(temperature), {}))
        return sorted(float(k) for k in keys)

    def rates_at(self, threshold: float) -> dict[str, float] | None:
        """The calibrated rates at `threshold` (one of `thresholds`), or None for a threshold never calibrated."""
        for budget, value in self.thresholds.items():
            if abs(value - threshold) < 1e-9 and budget in self.rates:
                return self.rates[budget]
        return None


def calibrated_rates(report: dict) -> dict[str, dict[str, float]]:
    """budget -> {"pass_rate", "false_accept_share"} from a scorer's test report in metrics.json
    ({"accept_rate", "operating_points": {budget: {"false_accept", "pass_rate", ...}}}): the share of gate
    decisions that pass, and the share of passed tokens that were label 0 (what a decode-time pass costs)."""
    accept = report["accept_rate"]
    return {k: {"pass_rate": p["pass_rate"],
                "false_accept_share": p["false_accept"] * (1 - accept) / p["pass_rate"] if p["pass_rate"] else 0.0}
            for k, p in report["operating_points"].items()}


def default_arch(**overrides: Any) -> dict[str, Any]:
    arch = {"width": 256, "depth": 2, "norm": "layer", "dropout": 0.0, "token_dim": 16, "vocab_size": 0}
    arch.update(overrides)
    return arch


class Verifier(nn.Module):
    """features dict -> one logit per row; P(accept) = sigmoid(logit)."""

    def __init__(self, info: VerifierInfo) -> None:
        super().__init__()
        arch = info.arch
        self.features = info.features
        self.scalar_features = info.scalar_features
        width, depth, norm = int(arch["width"]), int(arch["depth"]), arch["norm"]
        if norm not in NORMS:
            raise SprinterError(f"norm: got {norm!r}; expected one of {NORMS}")
        if depth < 0 or (depth > 0 and width < 1):
            raise SprinterError(f"depth/width: got {depth}/{width}; expected depth >= 0 and width >= 1")
        H = info.hidden_size
        # Standardisation statistics (set from the train split; identity until then).
        self.register_buffer("hidden_mean", torch.zeros(H))
        self.register_buffer("hidden_std", torch.ones(H))
        self.register_buffer("scalar_mean", torch.zeros(len(self.scalar_features)))
        self.register_buffer("scalar_std", torch.ones(len(self.scalar_features)))
        n_in = H + len(self.scalar_features)
        self.has_prev_layer = HIDDEN_PREV in self.features
        if self.has_prev_layer:  # registered only when read: checkpoints without the feature keep their state dict
            self.register_buffer("hidden_prev_mean", torch.zeros(H))
            self.register_buffer("hidden_prev_std", torch.ones(H))
            n_in += H
        self.token_embedding = None
        if TOKEN in self.features:
            if int(arch["vocab_size"]) < 1 or int(arch["token_dim"]) < 1:
                raise SprinterError(f"token_id feature needs vocab_size and token_dim >= 1; got {arch}")
            self.token_embedding = nn.Embedding(int(arch["vocab_size"]), int(arch["token_dim"]))
            n_in += int(arch["token_dim"])
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers.append(nn.Linear(n_in, width))
            if norm == "layer":
                layers.append(nn.LayerNorm(width))
            elif norm == "rms":
                layers.append(nn.RMSNorm(width))
            layers += [nn.GELU(), nn.Dropout(float(arch["dropout"]))]
            n_in = width
        layers.append(nn.Linear(n_in, 1))
        self.net = nn.Sequential(*layers)

    def set_normalisation(self, hidden_mean, hidden_std, scalar_mean, scalar_std, prev_mean=None,
                          prev_std=None) -> None:
        """Store standardisation statistics (std clamped away from 0 so constant columns stay finite);
        prev_*: those of hidden_prev_layer, when it is a feature."""
        pairs = [("hidden_mean", hidden_mean), ("hidden_std", hidden_std.clamp_min(1e-6)),
                 ("scalar_mean", scalar_mean), ("scalar_std", scalar_std.clamp_min(1e-6))]
        if self.has_prev_layer:
            if prev_mean is None or prev_std is None:
                raise SprinterError("set_normalisation: the verifier reads hidden_prev_layer; expected its "
                                    "statistics (prev_mean, prev_std)")
            pairs += [("hidden_prev_mean", prev_mean), ("hidden_prev_std", prev_std.clamp_min(1e-6))]
        for name, value in pairs:
            getattr(self, name).copy_(value)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """features: "hidden" (and "hidden_prev_layer") (N, H), each scalar feature (N,), "token_id" (N,) long
        -> logits (N,) float32.

        Inputs are cast to the verifier's own dtype (call `.to(hidden.dtype)` to run it in half precision).
        """
        missing = [f for f in self.features if f not in features]
        if missing:
            raise SprinterError(f"verifier input: missing feature(s) {missing}; expected {list(self.features)}")
        dtype = self.hidden_mean.dtype
        parts = [(features[HIDDEN].to(dtype) - self.hidden_mean) / self.hidden_std]  # (N, H)
        if self.has_prev_layer:
            parts.append((features[HIDDEN_PREV].to(dtype) - self.hidden_prev_mean) / self.hidden_prev_std)  # (N, H)
        if self.token_embedding is not None:
            parts.append(self.token_embedding(features[TOKEN].long()).to(dtype))  # (N, D)
        if self.scalar_features:
            scalars = torch.stack([features[f].to(dtype) for f in self.scalar_features], dim=-1)  # (N, S)
            parts.append((scalars - self.scalar_mean) / self.scalar_std)
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1).float()  # (N,)


# ------------------------------------------------------------------------------------------ checkpoint
def checkpoint_file(path: str | Path) -> Path:
    """A folder means FOLDER/verifier.safetensors; a file path is used as given."""
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or (path.suffix != ".safetensors" and not path.is_file()) else path


def feature_spec(info: VerifierInfo) -> str:
    """A fingerprint of what the weights read, slot by slot: the feature list in order and the hidden size.
    Stored at save time; a metadata list edited afterwards (reordered, renamed) no longer matches it."""
    spec = {"features": list(info.features), "scalars": list(info.scalar_features), "hidden_size": info.hidden_size}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def save_verifier(path: str | Path, verifier: Verifier, info: VerifierInfo,
                  probe: dict[str, torch.Tensor] | None = None) -> Path:
    """Write weights + metadata atomically (temp file, fsync, rename); returns the file written.

    probe: a few validation rows (feature -> (N, ...) tensor); stored with the logits the verifier gives them
    now, so a load can tell whether the weights are still the ones saved (see `check_probe`)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    file = checkpoint_file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "feature_spec": feature_spec(info),
                **{k: json.dumps(v) for k, v in dataclasses.asdict(info).items()}}
    # For readers of the header only: the statistics the module applies are its buffers (the weights).
    metadata["normalisation"] = json.dumps({
        "scalars": {f: [float(m), float(s)] for f, m, s in zip(info.scalar_features, verifier.scalar_mean,
                                                                  verifier.scalar_std)},
        "hidden": "standardised per dimension with the buffers hidden_mean, hidden_std"})
    state = {k: v.detach().cpu().contiguous() for k, v in verifier.state_dict().items()}
    if probe is not None:
        state.update(probe_tensors(verifier, probe))

    def write(tmp: str) -> None:
        try:
            save_file(state, tmp, metadata=metadata)
        except SafetensorError as err:  # safetensors' own type, not an OSError: said as the OSError it is
            found = re.search(r"os error (\d+)", str(err))
            code = int(found.group(1)) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(file)) from None

    return write_atomic(file, write)


def probe_tensors(verifier: Verifier, probe: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The probe rows the verifier reads and the logits it gives them now, as `probe.*` tensors."""
    rows = {f: probe[f].detach().cpu().contiguous() for f in verifier.features}
    was_training = verifier.training
    verifier.eval()
    with torch.no_grad():
        logits = verifier({f: v.to(verifier.hidden_mean.device) for f, v in rows.items()}).cpu()  # (N,)
    verifier.train(was_training)
    return {**{PROBE + f: v for f, v in rows.items()}, PROBE + "logits": logits.contiguous()}


def update_info(path: str | Path, **changes: Any) -> VerifierInfo:
    """Rewrite a checkpoint's metadata (e.g. `stop_threshold=0.5`) atomically; the weights are kept as they are."""
    from safetensors.torch import load_file

    names = {f.name for f in dataclasses.fields(VerifierInfo)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise SprinterError(f"verifier metadata: got field(s) {unknown}; expected some of {sorted(names)}")
    file = checkpoint_file(path)
    info = dataclasses.replace(read_info(file), **changes)
    verifier = Verifier(info)
    state = load_file(str(file))
    probe = {k[len(PROBE):]: state.pop(k) for k in list(state) if k.startswith(PROBE)}
    verifier.load_state_dict(state, strict=True)
    save_verifier(file, verifier, info, probe or None)
    return info


def read_info(path: str | Path) -> VerifierInfo:
    """The metadata of a verifier checkpoint, without loading weights."""
    from safetensors import SafetensorError, safe_open

    file = checkpoint_file(path)
    if not file.is_file():
        raise SprinterError(f"verifier: got {str(path)!r}; expected a folder with {FILE_NAME} or that file")
    try:
        with safe_open(str(file), "pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise SprinterError(f"verifier {str(file)!r} is not a readable safetensors file: {err}") from None
    if metadata.get("format") != FORMAT:
        raise SprinterError(f"verifier {str(file)!r}: format {metadata.get('format')!r}; expected {FORMAT!r}")
    names = {f.name for f in dataclasses.fields(VerifierInfo)}
    try:
        values = {k: json.loads(v) for k, v in metadata.items() if k in names}
    except json.JSONDecodeError as err:
        raise SprinterError(f"verifier {str(file)!r}: unreadable metadata ({err})") from None
    from sprinter.verifier_checks import check_info

    check_info(values, file)
    info = VerifierInfo(**values)
    info.thresholds = {str(k): float(v) for k, v in info.thresholds.items()}
    info.kept_thresholds = {str(t): {str(k): float(v) for k, v in part.items()}
                            for t, part in info.kept_thresholds.items()}
    stored = metadata.get("feature_spec")  # absent in checkpoints written before it existed
    if stored is not None and stored != feature_spec(info):
        raise SprinterError(f"verifier {str(file)!r}: metadata features {list(info.features)} (hidden size "
                            f"{info.hidden_size}) do not match the feature spec its weights were saved with "
                            f"(fingerprint {stored}, this list gives {feature_spec(info)}); expected the feature list "
                            "as scripts/train.py wrote it (reordered or renamed by hand?)")
    return info


def check_vocabulary(info: VerifierInfo, vocab_size: int, file: str | Path) -> None:
    """A verifier that embeds the drafted token must have a row for every token the draft can propose."""
    if TOKEN in info.features and int(info.arch["vocab_size"]) < vocab_size:
        raise SprinterError(f"verifier {str(file)!r} embeds {info.arch['vocab_size']} token ids; this pair's "
                            f"vocabulary has {vocab_size}: expected a verifier trained on this pair")


def load_verifier(path: str | Path, draft_fingerprint: str | None = None,
                  hidden_size: int | None = None) -> tuple[Verifier, VerifierInfo]:
    """Load a verifier (eval mode, CPU, float32); refuse one made for another draft or hidden size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from sprinter.verifier_checks import check_probe, check_weights

    file = checkpoint_file(path)
    info = read_info(file)
    trained_for = info.draft.get("fingerprint")
    if draft_fingerprint is not None and trained_for != draft_fingerprint:
        raise SprinterError(f"verifier {str(file)!r} was trained for draft {info.draft.get('name')!r} "
                            f"(fingerprint {trained_for!r}); got a draft with fingerprint {draft_fingerprint!r}")
    if hidden_size is not None and info.hidden_size != hidden_size:
        raise SprinterError(f"verifier {str(file)!r} expects hidden size {info.hidden_size}; got {hidden_size}")
    verifier = Verifier(info)
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise SprinterError(f"verifier {str(file)!r} is not a readable safetensors file: {err}") from None
    probe = {k[len(PROBE):]: state.pop(k) for k in list(state) if k.startswith(PROBE)}
    check_weights(state, file)
    ours = {k: tuple(v.shape) for k, v in verifier.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in state.items()}
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    if differ:  # named here: torch's message is many lines, and a first line that names no size
        k = differ[0]
        raise SprinterError(f"verifier {str(file)!r}: weights do not match its metadata: {k} has shape "
                            f"{list(theirs[k]) if k in theirs else 'none'} in the file; the metadata "
                            f"(hidden_size={info.hidden_size}, arch={info.arch}) expects "
                            f"{list(ours[k]) if k in ours else 'none'} ({len(differ)} tensor(s) differ)")
    verifier.load_state_dict(state, strict=True)
    verifier.eval()
    if probe:
        check_probe(verifier, info, probe, file)
    return verifier, info


