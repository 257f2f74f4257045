"""Files on disk: the one atomic writer every stage uses.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the final
name, so a reader (or a resumed run) sees either the old file or the whole new one, never half of it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, data: bytes | str | Callable[[str], object]) -> Path:
    """Write `data` to `path` atomically: bytes, text (UTF-8), or a function that writes a file at
    the temporary path it is given (for writers such as safetensors' `save_file`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str | Path, value: object) -> Path:
    """`value` as indented JSON with a final newline, written atomically."""
    return write_atomic(path, json.dumps(value, indent=2) + "\n")
