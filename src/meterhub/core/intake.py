"""One intake pause from several reasons: reading from gateways stops while any reason holds."""

from __future__ import annotations

from collections.abc import Callable


class IntakeGate:
    """``set(reason, True/False)`` from each source of back-pressure (storage behind, too many syncs
    in flight); ``apply(paused)`` (e.g. :meth:`meterhub.mqtt.server.MQTTServer.set_intake_paused`)
    is called when the union changes."""

    def __init__(self, apply: Callable[[bool], None]) -> None:
        self._apply = apply
        self.reasons: set[str] = set()

    def set(self, reason: str, on: bool) -> None:
        before = bool(self.reasons)
        if on:
            self.reasons.add(reason)
        else:
            self.reasons.discard(reason)
        if bool(self.reasons) != before:
            self._apply(not before)

    def setter(self, reason: str) -> Callable[[bool], None]:
        """A callback setting ``reason``: what a source (``GroupCommitWriter.on_pressure``) is given."""
        return lambda on: self.set(reason, on)
