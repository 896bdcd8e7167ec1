"""The call journal: every finished call is on disk before its client has the last byte of it.

Each process appends its :class:`~gateway.accounting.CallRecord` lines to a segment file of its
own in ``GATEWAY_JOURNAL_DIR``, with one ``write()`` each (it survives the process being killed; the
segment is ``fsync``-ed when sealed, every flush interval, for a machine that goes down). A process
holds an exclusive ``flock`` on every segment it has not yet written to the database, so a segment
nobody holds belongs to a process that died: the next process that looks takes its lock and writes
it (never two at once). A segment is created under a name no drainer looks at and renamed into
place once locked, so no drainer can take it between its creation and its lock. A segment's name
carries a digest of its database, so processes of several databases may share the directory: each
writes only its own database's segments. A segment is deleted only once its records are in the
database; while the database is away the sealed segments wait on disk, not in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings

logger = logging.getLogger(__name__)
SUFFIX = ".jsonl"
NEW = ".new"  # a segment being created, not yet locked: no drainer looks at this name


def _lock(path: Path, flags: int = 0) -> int | None:
    """Open and lock a segment; None when another live process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class Segment:
    __slots__ = ("fd", "path")

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def lines(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break  # cut short by a crash mid-write: no client saw this call end
                yield orjson.loads(line)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class Journal:
    """This process's segments: one open for appending, the sealed ones not yet written."""

    def __init__(self, directory: Path, process: str, database: str = "db") -> None:
        # `database` names the database the records belong to: a segment is only ever written to its own.
        self.directory, self.process, self.database = directory, process, database
        self.lock = threading.Lock()
        self.number = 0
        self.current: Segment | None = None
        self.appended = 0  # lines in the current segment
        self.sealed: list[Segment] = []

    def _open(self) -> Segment:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.number += 1
        path = self.directory / f"{self.database}-{os.getpid()}-{self.process}-{self.number:08d}{SUFFIX}"
        creating = path.with_suffix(NEW)
        fd = _lock(creating, os.O_CREAT | os.O_EXCL)
        assert fd is not None, f"{creating} is new and unknown to drainers: nobody else can hold it"
        os.rename(creating, path)  # the lock is the open file's: it holds under the new name
        return Segment(path, fd)

    def append(self, record: object) -> None:
        line = orjson.dumps(record) + b"\n"
        with self.lock:
            if self.current is None:
                self.current = self._open()
            os.write(self.current.fd, line)
            self.appended += 1

    def seal(self) -> list[Segment]:
        """Close the current segment to appends (on disk for good) and return every sealed one.

        The `fsync` runs outside the lock: appends (on the event loop) go on into a new segment
        meanwhile, instead of waiting for the disk."""
        with self.lock:
            closing = self.current if self.appended else None
            if closing is not None:
                self.sealed.append(closing)
                self.current, self.appended = None, 0
        if closing is not None:
            os.fsync(closing.fd)
        with self.lock:
            return list(self.sealed)

    def done(self, segment: Segment) -> None:
        with self.lock:
            self.sealed.remove(segment)
        segment.remove()

    @property
    def backlog(self) -> int:
        return len(self.sealed) + (1 if self.appended else 0)

    def orphans(self) -> Iterator[Segment]:
        """Segments of processes that died, each locked by us while the caller writes it."""
        if not self.directory.is_dir():
            return
        ours = {segment.path for segment in self.sealed}
        if self.current is not None:
            ours.add(self.current.path)
        for path in sorted(self.directory.glob(f"{self.database}-*{SUFFIX}")):
            if path in ours:
                continue
            try:
                fd = _lock(path)
            except FileNotFoundError:
                continue  # written and removed meanwhile
            if fd is None:
                continue  # a live process holds it
            if not path.exists():  # removed between our open and our lock
                os.close(fd)
                continue
            yield Segment(path, fd)


_journal: Journal | None = None


def journal() -> Journal:
    global _journal
    if _journal is None:
        from gateway.ledger_cache import PROCESS

        db = settings.DATABASES["default"]
        where = f"{db['ENGINE']}:{db.get('HOST', '')}:{db.get('PORT', '')}:{db['NAME']}"
        _journal = Journal(Path(settings.GATEWAY_JOURNAL_DIR), PROCESS, hashlib.sha256(where.encode()).hexdigest()[:12])
    return _journal
