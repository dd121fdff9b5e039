"""Opt-in leak report (``METERHUB_TEST_LEAKS=1``): open descriptors and threads per test.

Before each test's setup and after its teardown it reads ``/proc/self/fd`` (with the readlink
targets) and ``threading.enumerate()``; the tests that leave more than they found are listed at the
end of the run, worst first, with what they left (``socket``, ``anon_inode:[eventpoll]``, a file
path, a thread's name ...). Module-scoped fixtures are torn down after a module's last test, so
their leaks (or their give-backs) show on that test.
"""

from __future__ import annotations

import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

#: numbers and hex ids in readlink targets / thread names, so that like things are counted together
_IDS = re.compile(r"\[\d+\]|\d+|0x[0-9a-f]+")


def open_fds() -> Counter[str]:
    """This process's open descriptors, counted by kind (the readlink target without its ids; a
    TCP socket as ``tcp:LISTEN:port``, ``tcp:ESTABLISHED->port`` ...)."""
    kinds: Counter[str] = Counter()
    sockets: dict[str, str] | None = None
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor listdir itself used, closed by now
        if target.startswith("socket:["):
            if sockets is None:
                sockets = _tcp_sockets()
            kinds[sockets.get(target[8:-1], "socket")] += 1
        else:
            kinds[_IDS.sub("#", target) if ":" in target else _kind_of_path(target)] += 1
    return kinds


_TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "0A": "LISTEN"}


def _tcp_sockets() -> dict[str, str]:
    """inode -> a short description of each TCP socket of this network namespace."""
    found: dict[str, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            remote, state, inode = parts[2], parts[3], parts[9]
            st = _TCP_STATES.get(state, state)
            if st == "LISTEN":
                found[inode] = "tcp:LISTEN"
            else:
                found[inode] = f"tcp:{st}->{int(remote.rsplit(':', 1)[1], 16)}"
    return found


def _kind_of_path(path: str) -> str:
    if path.startswith("/tmp/pytest-") or "/pytest-of-" in path:
        return "tmp:" + os.path.basename(path)
    return path


def live_threads() -> Counter[str]:
    """Live threads, counted by name without its numbers."""
    return Counter(_IDS.sub("#", t.name) for t in threading.enumerate())


def _positive(diff: Counter[str]) -> dict[str, int]:
    return {k: v for k, v in diff.items() if v > 0}


class LeakCheck:
    """The pytest plugin: registered by tests/conftest.py when ``METERHUB_TEST_LEAKS`` is set."""

    def __init__(self, top: int = 25) -> None:
        self.top = top
        self.leaks: list[tuple[int, int, str, dict[str, int], dict[str, int]]] = []
        self.first: tuple[Counter[str], Counter[str]] | None = None
        self.last: tuple[Counter[str], Counter[str]] | None = None
        self.peak_fds = 0

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item) -> Iterator[None]:
        fds, threads = open_fds(), live_threads()
        if self.first is None:
            self.first = (fds, threads)
        yield
        fds_after, threads_after = open_fds(), live_threads()
        self.last = (fds_after, threads_after)
        self.peak_fds = max(self.peak_fds, fds_after.total())
        dfd = fds_after.total() - fds.total()
        dth = threads_after.total() - threads.total()
        if dfd > 0 or dth > 0:
            self.leaks.append(
                (dfd, dth, item.nodeid, _positive(fds_after - fds), _positive(threads_after - threads))
            )

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        tr = terminalreporter
        tr.section("descriptor and thread leaks (METERHUB_TEST_LEAKS)")
        if self.first is None or self.last is None:
            tr.write_line("no test ran")
            return
        (fds0, th0), (fds1, th1) = self.first, self.last
        tr.write_line(
            f"open fds: {fds0.total()} before the first test, {fds1.total()} after the last "
            f"(peak after a test: {self.peak_fds}); threads: {th0.total()} -> {th1.total()}"
        )
        tr.write_line(f"fds left over the run: {_positive(fds1 - fds0)}")
        tr.write_line(f"threads left over the run: {_positive(th1 - th0)}")
        worst = sorted(self.leaks, key=lambda x: (x[0], x[1]), reverse=True)[: self.top]
        tr.write_line(f"{len(self.leaks)} tests left more than they found; the worst {len(worst)}:")
        for dfd, dth, nodeid, fds, threads in worst:
            tr.write_line(f"  +{dfd} fds +{dth} threads  {nodeid}  {fds} {threads}")
