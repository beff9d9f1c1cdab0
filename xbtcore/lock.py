"""One writer per folder: an advisory lock that the OS drops when its process ends, however it ends.

Two `xbt upgrade` runs into one --out, or an `xbt index` and an `xbt backfill` on one index, would
each replace what the other wrote: the second is refused at once instead, naming the one at work.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .data import InputError

LOCK_FILE = ".xbt.lock"


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True):
    """Hold an exclusive lock on the file `path` (created if missing); yields True, or False where
    wait=False and another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def exclusive(folder: str | Path, command: str, fix: str):
    """Hold FOLDER/.xbt.lock while writing FOLDER (created if missing); an InputError naming the
    command at work there when another process holds it. command: what writes ("xbt upgrade")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    with file_lock(path, wait=False) as held:
        if not held:
            raise _writing_there(folder, fix)
        path.write_text(f"{os.getpid()} {command}\n")
        yield


def _writing_there(folder: Path, fix: str) -> InputError:
    pid, _, holder = (folder / LOCK_FILE).read_text().strip().partition(" ")
    return InputError(folder, f"{holder or 'another xbt command'} (pid {pid or '?'}) is writing there", fix)


def refuse_if_busy(folder: str | Path, fix: str) -> None:
    """Before slow set-up (input checks, servers): the error `exclusive` would give, while another
    process holds FOLDER's lock. The lock itself is taken by `exclusive`, where the writing starts."""
    if busy(folder):
        raise _writing_there(Path(folder), fix)


def busy(folder: str | Path) -> bool:
    """Whether another process holds FOLDER's lock now."""
    path = Path(folder) / LOCK_FILE
    if not path.is_file():
        return False
    with file_lock(path, wait=False) as held:
        return not held
