"""One job per output: an exclusive lock beside the scores file. Standard library only, so that a second job on the
same output is refused before torch is even imported."""

from __future__ import annotations

import os
from pathlib import Path


def lock_path_for(scores_path: str | Path) -> Path:
    p = Path(scores_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".lock")


class JobLock:
    """An exclusive lock on one output for a job's whole run (fcntl.flock on SCORES.lock, which holds the owner's pid):
    a second job on the same output fails at once instead of writing every line twice. The kernel drops the lock
    when its process ends, however it ends, so a killed job never leaves a stale lock."""

    __slots__ = ("_fh", "path")

    def __init__(self, scores_path: str | Path) -> None:
        import fcntl

        self.path = lock_path_for(scores_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release())
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                owner = fh.read().strip() or "unknown"
                fh.close()
                raise ValueError(f"another `ixc-engine score` (pid {owner}) is writing to {Path(scores_path)} (it "
                                 f"holds {self.path}): wait for it to finish, or choose another -o") from None
            try:  # the holder may have removed the file before we locked it (release()): lock the new one
                if os.stat(self.path).st_ino == os.fstat(fh.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        """Drop the lock and remove the lock file (a finished or failed job leaves no lock file behind). It is removed
        while still held; a job that had opened the old file sees, once it holds the lock, that the path is gone or
        is another file, and locks the new one (see __init__), so two jobs never hold "the" lock at once."""
        if self._fh is not None:
            self.path.unlink(missing_ok=True)
            self._fh.close()  # closing the file drops the flock
            self._fh = None
