"""The server lock of the embedded database: one serving process per SQLite database.

A second ``meterhub serve`` (or ``demo``) on the same data directory would share the running one's
database and, at start, mark every device offline. So a process that serves takes an exclusive
advisory lock (``fcntl.flock``) on ``<database file>.lock`` (``data/meterhub.db.lock`` by default)
before it touches the database, and holds it for its life; the operating system releases it when the
process ends, also on a crash or ``kill -9``. The file holds the pid of the holder, for the message.

Only SQLite file databases are locked: several nodes of a cluster legitimately share one PostgreSQL
database. Offline CLI commands (``vendor add``, ``token create``, ...) take no lock and keep working
while a server runs. Two locks on one file conflict even within one process (``flock`` locks belong
to the open file): ``demo`` takes its hub's own lock before it touches the database.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

__all__ = ["DataDirInUse", "LockError", "ServerLock", "lock_path_for"]


class LockError(Exception):
    """The server lock cannot be taken; the message is one line for the operator."""


class DataDirInUse(LockError):
    """Another process serves this database."""


def lock_path_for(database_url: str) -> Path | None:
    """The lock file for a database URL: beside a SQLite file; None for other databases."""
    if not database_url.startswith("sqlite"):
        return None
    path = database_url.split("///", 1)[-1].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    db = Path(path).resolve()
    return db.with_name(db.name + ".lock")


class ServerLock:
    """The exclusive lock on one lock file (``path`` None: nothing to lock, e.g. PostgreSQL)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None

    @classmethod
    def for_url(cls, database_url: str) -> ServerLock:
        return cls(lock_path_for(database_url))

    def acquire(self) -> None:
        """Take the lock or raise :class:`DataDirInUse` at once (never waits; :class:`LockError` when
        the lock file cannot be made). Taking it again is a no-op."""
        if self.fd is not None or self.path is None or fcntl is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LockError(f"cannot create the lock file {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirInUse(self._in_use_message()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Let the lock go (closing the file releases it; the file stays, removing it would race
        with the next server taking it)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def _in_use_message(self) -> str:
        assert self.path is not None
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        who = f" (pid {pid})" if pid.isdigit() else ""
        return (
            f"the database {self.path.with_suffix('')} is in use by another meterhub server{who}; "
            "stop it, or give this one another --data-dir"
        )
