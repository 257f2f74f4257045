"""Files on disk: the one atomic writer, the one text reader and the output-folder lock every stage uses.

A file is written to a temporary name in its own folder, flushed to disk, then renamed over the final
name, so a reader (or a resumed run) sees either the old file or the whole new one, never half of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from sprinter.errors import SprinterError


def write_atomic(path: str | Path, data: bytes | str | Callable[[str], object]) -> Path:
    """Write `data` to `path` atomically: bytes, text (UTF-8), or a function that writes a file at
    the temporary path it is given (for writers such as safetensors' `save_file`)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
            with open(tmp, "rb") as fh:  # on disk before the rename, as below
                os.fsync(fh.fileno())
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.exists(tmp):
            os.remove(tmp)
        if err.filename is None:  # a failed write names no file: name the one that was being written
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path: str | Path, value: object) -> Path:
    """`value` as indented JSON with a final newline, written atomically."""
    return write_atomic(path, json.dumps(value, indent=2) + "\n")


# ------------------------------------------------------------------------------------------- reading text
def _decode(data: bytes, path: Path, what: str, first_line: int = 1) -> str:
    """Strict UTF-8: a file that is not is refused, naming the file and the line, never read with U+FFFD."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        raise SprinterError(f"{what} {str(path)!r} line {line}: byte {data[err.start]:#04x} is not UTF-8; expected "
                            "UTF-8 text (re-encode it, e.g. iconv -f latin1 -t utf-8)") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """The whole of a text file (prompts, corpora, configs), decoded as strict UTF-8. `what` names the file's role
    in messages ("--config", "prompts_file")."""
    path = Path(path)
    return _decode(path.read_bytes(), path, what)


def iter_lines(path: str | Path, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number from 1, line) of a text file read as a stream (for .jsonl files larger than memory)."""
    path = Path(path)
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            yield number, _decode(raw, path, what, number)


def read_json(path: str | Path, what: str = "file") -> object:
    """A JSON file, refused in one line (file, line, reason) when it is not UTF-8 or not JSON."""
    path = Path(path)
    try:
        text = read_text(path, what)
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SprinterError(f"{what} {str(path)!r} line {err.lineno}: not valid JSON ({err.msg}); expected the JSON "
                            "file this tool writes (a damaged or hand-edited file?)") from None


# ------------------------------------------------------------------------------------------- the folder lock
LOCK_NAME = ".lock"


def _rank_zero() -> bool:
    """Whether this process is the first of a torchrun / Lightning group (the one that holds a folder's lock)."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "NODE_RANK", "LOCAL_RANK"))


def _started(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), so a reused pid is not taken for its holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(info: dict) -> bool:
    """Whether the process a lock file names still runs (its pid exists, with the same start time)."""
    pid = int(info["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    return info.get("pid_started") is None or _started(pid) in (None, info["pid_started"])


class FolderLock:
    """One writer per output folder: `with FolderLock(out, "collect"): ...`.

    The lock is an exclusive `flock` on OUT/.lock, which names its holder (pid, host, command). The kernel
    drops the flock when its holder dies, however it dies, so a lock left by a killed process is taken over;
    the pid is checked as well (for file systems where flock is a no-op), and the takeover is reported.
    A second writer, fresh or resumed, is refused with one line naming the holder. Ranks other than 0 of a
    torchrun or Lightning group hold nothing: their rank 0 holds the folder for them.
    """

    def __init__(self, folder: str | Path, what: str, lock_file: str | Path | None = None) -> None:
        """`lock_file`: where the lock lives when not FOLDER/.lock (a stage that replaces FOLDER whole keeps its
        lock beside it)."""
        self.folder, self.what = Path(folder), what
        self.path = Path(lock_file) if lock_file is not None else self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made: Path | None = None  # the top folder this lock created, removed again if left empty

    def __enter__(self) -> "FolderLock":
        if not _rank_zero():
            return self
        home = self.path.parent
        missing = [p for p in (home, *home.parents) if not p.exists()]
        home.mkdir(parents=True, exist_ok=True)
        self._made = missing[-1] if missing else None
        path = self.path
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise SprinterError(f"out: {str(self.folder)!r} is in use by another {self.what} ({holder}); "
                                    "expected one writer per folder: wait for it to finish, stop it, or choose "
                                    "another --out") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:  # its holder removed it as we opened it
                same = False
            if same:
                break
            os.close(fd)  # locked a file that a finishing holder had just removed: lock the new one
        old = self._holder_info(fd)
        if old and old.get("host") == socket.gethostname() and old.get("pid") not in (None, os.getpid()) \
                and _alive(old):
            os.close(fd)  # flock is a no-op on this file system and the holder is still running
            raise SprinterError(f"out: {str(self.folder)!r} is in use by another {self.what} "
                                f"({self._describe(old)}); expected one writer per folder: wait for it to finish, "
                                "stop it, or choose another --out")
        if old:
            print(f"note: took over the lock on {str(self.folder)!r} left by {self._describe(old)}, which is no "
                  "longer running", file=sys.stderr)
        me = {"pid": os.getpid(), "pid_started": _started(os.getpid()), "host": socket.gethostname(), "what": self.what,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before the unlock: a waiter then locks a new file
        os.close(self._fd)
        self._fd = None
        if self._made is not None:  # a refused run leaves no folder it made behind (only empty ones are removed)
            for folder in (self.path.parent, *self.path.parent.parents):
                try:
                    folder.rmdir()
                except OSError:
                    break
                if folder == self._made:
                    break

    @staticmethod
    def _holder_info(fd: int) -> dict | None:
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "null")
        except json.JSONDecodeError:
            return None
        return info if isinstance(info, dict) else None

    @staticmethod
    def _describe(info: dict) -> str:
        return f"{info.get('what', 'run')} pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"

    def _holder(self, fd: int) -> str:
        info = self._holder_info(fd)
        return self._describe(info) if info else "holder unknown"
