"""First outputs: from the code that consumes a `generate` stream to the request router that
routed the call.

Serve's `RequestRouter` sees a handle call routed and ended, never a streamed output; our Router
deployment's `ServeBackend` sees the outputs. Both live in the Router replica's process, on
different event loops. The registry is a module of its own, not part of serve_router: Serve
pickles the request router's module by value, so that module's globals in the running router
are a copy, not the ones `ServeBackend` imports; this module is pickled by reference, and both
sides reach the same registry.
"""

from __future__ import annotations

import threading
import weakref
from typing import Protocol


class FirstOutputListener(Protocol):
    def first_output_seen(self, request_id: str) -> None:
        """Called from any thread; the listener hands it to its own event loop."""


_listeners: weakref.WeakSet[FirstOutputListener] = weakref.WeakSet()
_lock = threading.Lock()  # listeners subscribe on Serve's router loop, outputs come on the app's


def subscribe(listener: FirstOutputListener) -> None:
    """Until it is garbage-collected (Serve drops a request router with its handle)."""
    with _lock:
        _listeners.add(listener)


def first_output_seen(request_id: str) -> None:
    """The request's first output reached its caller: its prefill is done."""
    with _lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener.first_output_seen(request_id)
