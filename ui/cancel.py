"""CancelRegistry: what Stop sets, one event per browser or API session."""

from __future__ import annotations

import threading


class CancelRegistry:
    """Stop support: one event per browser/API session, checked after every denoising step."""

    def __init__(self):
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def start(self, session: str) -> threading.Event:
        """A fresh event for the session's new generation."""
        event = threading.Event()
        with self._lock:
            self._events[session] = event
        return event

    def stop(self, session: str) -> bool:
        """Ask the session's running generation to stop."""
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()
        return event is not None

    def finish(self, session: str, event: threading.Event) -> None:
        """Forget the session's event if it is still this one."""
        with self._lock:
            if self._events.get(session) is event:
                del self._events[session]
