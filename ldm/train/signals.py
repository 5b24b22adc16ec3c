"""SIGTERM/SIGINT -> "stop after this step": the loop finishes the step, checkpoints and exits 0.

The flag is only a request; the loop all-reduces it every step so that every process stops at the
same step (a rank that stopped alone would hang the others in their next collective). A second
SIGINT restores the default behaviour, so Ctrl-C twice still interrupts a stuck run.
"""
from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

logger = logging.getLogger(__name__)


class StopRequest:
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("received %s: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        # signal handlers can only be set from the main thread (a caller running us in a thread gets none)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def ignore_stop_signals_in_worker(_worker_id: int) -> None:
    """DataLoader workers share the process group that Ctrl-C (and many schedulers' SIGTERM) reach:
    they must not die before the main process has finished its step and saved. They still exit when
    the main process does (PyTorch's workers watch their parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
