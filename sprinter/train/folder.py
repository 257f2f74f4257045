"""The training stage's output folder: the same rules as collect's and the benchmark's, and whole files only.

- A finished folder (verifier.safetensors and metrics.json) is replaced only with --overwrite; an interrupted one
  (lightning/last.ckpt without a finished verifier) is continued with --resume last, or restarted with --overwrite.
- Lightning's .ckpt files are written like every other file of the project (sprinter.files.write_atomic: a temp
  file, fsync, rename), so a full disk or a kill leaves the previous whole file, never a cut-short one.
- A write that fails for want of space is one line whose advice works for the folder as it was left.
- A --resume file is checked before Lightning reads it: never unpickled, and from this very run.
"""

from __future__ import annotations

import errno
import io
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from sprinter.errors import SprinterError
from sprinter.files import write_atomic

if TYPE_CHECKING:
    from sprinter.train.fit import VerifierModule

LAST = Path("lightning") / "last.ckpt"
FINISHED = ("verifier.safetensors", "metrics.json")
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no room for the file: the same advice


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, but the file appears under its name only once it is whole and on disk."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options: got {storage_options!r}; expected None")
        buffer = io.BytesIO()  # a verifier's checkpoint is small: serialised in memory, then written in one go
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())


def check_out_folder(out: Path, resume: str | None, overwrite: bool) -> None:
    """Refuse a finished folder without --overwrite and an interrupted one without --resume; with --overwrite,
    remove the old run's Lightning checkpoints (the rest is replaced file by file as the new run writes it)."""
    finished = all((out / name).is_file() for name in FINISHED)
    if overwrite:
        shutil.rmtree(out / "lightning", ignore_errors=True)
        return
    if resume is not None:
        return
    if finished:
        raise SprinterError(f"out: {str(out)!r} already holds a finished verifier ({', '.join(FINISHED)}); expected "
                            "--overwrite to replace it, or another --out")
    if (out / LAST).is_file():
        raise SprinterError(f"out: {str(out)!r} holds an interrupted training ({str(LAST)}); expected --resume last "
                            "to continue it, or --overwrite to start again")


def full_disk(err: OSError, out: Path) -> SprinterError:
    """A write that failed for want of space, as one line whose advice works for the folder as it is now."""
    where = f"{err.filename!r}: " if err.filename else ""
    if (out / LAST).is_file():
        advice = (f"free some space, then rerun the same command with --resume last ({str(out / LAST)!r} holds the "
                  "last finished epoch, whole)")
    else:
        advice = "free some space, then rerun the same command (no epoch had been checkpointed; nothing to resume)"
    return SprinterError(f"{where}{err.strerror or 'no space left'} while training into {str(out)!r}; expected "
                         f"free space on that disk: {advice}")


def check_resume(path: Path, module: "VerifierModule") -> None:
    """A --resume file must be a Lightning checkpoint that this run wrote, for this very model, before Lightning
    reads it. It is never unpickled: a torch zip archive is read with `weights_only=True` (tensors and plain data
    only, no code), and its model is compared with this run's, so a wrong file is one line, not a traceback."""
    import pickle
    import zipfile

    expected = "expected OUT/lightning/last.ckpt (or best.ckpt) of an interrupted run of scripts/train.py with " \
               "the same data and model options"
    if not zipfile.is_zipfile(path):
        raise SprinterError(f"resume: {str(path)!r} is not a Lightning checkpoint (not a torch zip archive: another "
                            f"kind of file, or cut short); {expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile):
        # torch's own message would advise weights_only=False, i.e. running the file's code: never say that
        raise SprinterError(f"resume: {str(path)!r} is damaged or holds more than tensors and plain data; "
                            f"{expected}") from None
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not (isinstance(hparams, dict) and isinstance(ckpt.get("state_dict"), dict) and "best" in ckpt
            and "pytorch-lightning_version" in ckpt):
        raise SprinterError(f"resume: {str(path)!r} is not a checkpoint of scripts/train.py (no Lightning state "
                            f"with this stage's fields); {expected}")
    ours = {k: v.shape for k, v in module.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    differ = sorted(k for k in ours.keys() | theirs.keys() if tuple(ours.get(k, ())) != theirs.get(k, ()))
    if differ:
        k = differ[0]
        raise SprinterError(f"resume: {str(path)!r} holds another model: {k} has shape {list(theirs.get(k, []))} "
                            f"there and {list(ours.get(k, []))} in this run ({len(differ)} tensor(s) differ; were "
                            f"--width, --depth, --features or the data changed?); {expected}")
    theirs_cfg, ours_cfg = hparams.get("cfg"), module.cfg
    if isinstance(theirs_cfg, dict):  # same shapes, another run: name the options that differ
        differ = [k for k in SAME_RUN if k in theirs_cfg and _plain(theirs_cfg[k], k) != _plain(ours_cfg.get(k), k)]
        if differ:
            shown = ", ".join(f"{k}={_plain(theirs_cfg[k], k)!r} there, {_plain(ours_cfg.get(k), k)!r} here"
                              for k in differ)
            raise SprinterError(f"resume: {str(path)!r} was written by another run: {shown}; {expected}")


# The options a resumed run must share with the run that wrote its checkpoint (the data, its split, the model,
# the label): others (epochs, patience, budgets, threads, progress) may change on resume.
SAME_RUN = ("data", "features", "label_rule", "width", "depth", "norm", "token_dim", "val_fraction", "test_fraction",
            "train_prompts", "seed")


def _plain(value: object, key: str = "") -> object:
    """An option's value as compared: data folders by name (a run may resume from another working directory)."""
    if key == "data":
        return [Path(str(p)).name for p in value] if isinstance(value, (list, tuple)) else value
    return list(value) if isinstance(value, (list, tuple)) else value
