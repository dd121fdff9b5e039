"""meterhub.core.dedupe.AnswerCache: bounded in entries and in age; digests tell redeliveries apart."""

from __future__ import annotations

from meterhub.core.dedupe import AnswerCache


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_entries_expire_by_age_and_by_count() -> None:
    clock = Clock()
    cache = AnswerCache(max_entries=3, max_age=10.0, clock=clock)
    cache.put(("gw", "a"), "d-a", 0)
    clock.now += 6
    cache.put(("gw", "b"), "d-b", 1101)
    assert cache.get(("gw", "a")) == ("d-a", 0)
    clock.now += 5  # "a" is 11 s old, "b" 5 s
    assert cache.get(("gw", "a")) is None
    assert len(cache) == 1
    cache.put(("gw", "c"), "d-c", 0)
    cache.put(("gw", "d"), "d-d", 0)
    cache.put(("gw", "e"), "d-e", 0)  # over the count: the oldest ("b") goes
    assert [cache.get(("gw", k)) is not None for k in "bcde"] == [False, True, True, True]
    clock.now += 60  # a put also drops what has aged out, even if never looked up again
    cache.put(("gw", "f"), "d-f", 0)
    assert len(cache) == 1


def test_settle_and_discard_only_touch_the_content_they_were_for() -> None:
    cache = AnswerCache(max_entries=10, max_age=60.0, clock=Clock())
    key = ("gw", "r-1")
    cache.put(key, "first", "future-1")
    cache.put(key, "second", "future-2")  # the request_id reused for other content meanwhile
    cache.settle(key, "first", 0)  # the first one's commit must not overwrite the second's entry
    cache.discard(key, "first")
    assert cache.get(key) == ("second", "future-2")
    cache.settle(key, "second", 0)
    assert cache.get(key) == ("second", 0)
    cache.discard(key, "second")
    assert cache.get(key) is None
