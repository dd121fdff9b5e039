"""Structured logging: structlog on top of the standard library, console or JSON lines."""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import structlog


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    """Route structlog and stdlib logging to stderr as key=value console lines or JSON lines."""
    renderer: structlog.types.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        # plain tracebacks: structlog's default (rich, with locals) costs milliseconds per error and
        # dozens of lines, which under an error storm (a fleet failing at once) starves the server
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("alembic").setLevel(max(logging.WARNING, root.level))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)


# --- repeated events: one line per interval, with a count ----------------------------------------

#: Seconds between two lines for one kind of repeated event (``log_repeat_interval``).
_REPEAT = {"interval": 60.0}
#: Most distinct keys one :class:`RateLimitedLog` tracks; events of further keys share one key.
MAX_KEYS = 1000


def set_repeat_interval(seconds: float) -> None:
    """Set the interval of every :class:`RateLimitedLog` (``meterhub serve`` sets it from settings)."""
    if not seconds > 0:
        raise ValueError("the repeat interval must be above 0")
    _REPEAT["interval"] = float(seconds)


class _Entry:
    __slots__ = ("count", "fields", "level", "next_at")

    def __init__(self, next_at: float) -> None:
        self.next_at = next_at
        self.count = 0  # events held back since the last line
        self.level = logging.INFO
        self.fields: dict[str, Any] = {}


class RateLimitedLog:
    """Logs an event that may repeat per message (a failed write, a rejected request) at most once
    per interval per key.

    The first event of a key is logged at once. Events of that key in the following interval are
    only counted; when the interval is over, one line is logged with the last one's fields and
    ``repeated=N`` (how many were held back), from the next event or, when none comes, from a
    background thread within about a second. So a flood of one error is a few lines with counts, and
    nothing is lost from view.

    ``key`` is any hashable (e.g. the event name, or ``(kind, gateway_id)``); past ``MAX_KEYS``
    distinct keys, new ones are counted under the event name alone. Thread-safe.
    """

    def __init__(self, logger: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._clock = clock
        self._entries: dict[Hashable, tuple[str, _Entry]] = {}
        self._lock = threading.Lock()
        _LIMITERS.add(self)

    def info(self, key: Hashable, event: str, **fields: Any) -> bool:
        return self.log(logging.INFO, key, event, **fields)

    def warning(self, key: Hashable, event: str, **fields: Any) -> bool:
        return self.log(logging.WARNING, key, event, **fields)

    def error(self, key: Hashable, event: str, **fields: Any) -> bool:
        return self.log(logging.ERROR, key, event, **fields)

    def log(self, level: int, key: Hashable, event: str, **fields: Any) -> bool:
        """Log or count one event; True when a line was written now."""
        now = self._clock()
        emit: tuple[int, str, dict[str, Any]] | None = None
        with self._lock:
            found = self._entries.get(key)
            if found is None and len(self._entries) >= MAX_KEYS:
                key = ("(more keys)", event)
                found = self._entries.get(key)
            if found is None:
                self._entries[key] = (event, _Entry(now + _REPEAT["interval"]))
                emit = (level, event, fields)
            else:
                entry = found[1]
                if now < entry.next_at:
                    entry.count += 1
                    entry.level = max(entry.level, level)
                    entry.fields = fields
                elif entry.count:
                    entry.count += 1
                    entry.level = max(entry.level, level)
                    entry.fields = fields
                    emit = self._due(found[0], entry, now)
                else:  # quiet for a whole interval: a first event again
                    entry.next_at = now + _REPEAT["interval"]
                    emit = (level, event, fields)
        if found is None:
            _ensure_flusher()
        if emit is None:
            return False
        self._log.log(emit[0], emit[1], **emit[2])
        return True

    def held_back(self, key: Hashable) -> int:
        """How many events of ``key`` were counted and not logged since its last line."""
        with self._lock:
            found = self._entries.get(key)
            return 0 if found is None else found[1].count

    def _due(self, event: str, entry: _Entry, now: float) -> tuple[int, str, dict[str, Any]]:
        fields = {k: v for k, v in entry.fields.items() if k != "exc_info"}  # the first line had it
        line = (entry.level, event, {**fields, "repeated": entry.count})
        entry.count = 0
        entry.level = logging.INFO
        entry.next_at = now + _REPEAT["interval"]
        return line

    def flush(self) -> int:
        """Write the pending count of every key whose interval is over; forget quiet keys. Returns the
        number of lines written."""
        now = self._clock()
        lines: list[tuple[int, str, dict[str, Any]]] = []
        with self._lock:
            for key, (event, entry) in list(self._entries.items()):
                if now < entry.next_at:
                    continue
                if entry.count:
                    lines.append(self._due(event, entry, now))
                else:  # a whole interval without the event: the next one is logged at once again
                    del self._entries[key]
        for level, event, fields in lines:
            self._log.log(level, event, **fields)
        return len(lines)


_LIMITERS: weakref.WeakSet[RateLimitedLog] = weakref.WeakSet()
_FLUSHER: dict[str, threading.Thread] = {}
_FLUSHER_LOCK = threading.Lock()


def _ensure_flusher() -> None:
    """Start the thread that writes held-back counts when no further event comes (once per process)."""
    if "thread" in _FLUSHER:
        return
    with _FLUSHER_LOCK:
        if "thread" in _FLUSHER:
            return
        thread = threading.Thread(target=_flush_forever, name="meterhub-log-repeats", daemon=True)
        _FLUSHER["thread"] = thread
        thread.start()


def _flush_forever() -> None:
    while True:
        time.sleep(min(1.0, _REPEAT["interval"] / 2))
        for limiter in list(_LIMITERS):
            with contextlib.suppress(Exception):  # logging must never kill the flusher
                limiter.flush()
