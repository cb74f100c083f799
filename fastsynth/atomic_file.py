"""Crash-safe file writes, shared by checkpoints, run outputs (fastsynth/distill.py) and the disk
pool's shards and index (fastsynth/synthesis/pool_store.py)."""
from __future__ import annotations

import os
from typing import Callable


def atomic_write(path: str, write: Callable[[object], None], binary: bool = True, fsync: bool = True,
                 sync_folder: bool = True) -> str:
    """Write ``path`` so that a crash at any moment leaves either the old file or the new one:
    into a temporary file in the same folder, flushed and fsynced, then renamed over ``path``
    (and the folder fsynced, so the rename itself survives a power loss where the OS allows).
    ``fsync=False`` keeps the rename (a killed process never leaves half a file) without the
    disk flushes, for files that can be rebuilt from a checkpoint. ``sync_folder=False`` leaves
    the folder's fsync to a later write in the same folder (several files, one folder flush)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if not (fsync and sync_folder):
        return path
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a folder cannot be opened on every OS (Windows)
        return path
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
    return path
