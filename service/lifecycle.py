"""Graceful shutdown ordering between the API workers and the Encoder worker.

BentoML's process manager (circus) sends SIGTERM to every worker at once. The API workers then
stop accepting and finish their requests in flight, but those requests still need the Encoder,
which would stop at the same moment and refuse them (measured: HTTP 500 for a request in
flight at SIGTERM). The Encoder therefore keeps serving for a grace period after SIGTERM and
only then hands the signal to uvicorn's own handler (which drains and exits). circus waits 30 s
(its default ``graceful_timeout``) before SIGKILL, so the grace must stay below that.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Callable

logger = logging.getLogger(__name__)


def delay_sigterm(grace_s: float) -> bool:
    """Defer this process's current SIGTERM handler by ``grace_s`` seconds.

    Call it after uvicorn installed its handlers (e.g. from an ``@bentoml.on_startup`` hook).
    The deferred call runs on a timer thread; uvicorn's handler only sets a flag, which is safe
    from any thread. A second SIGTERM during the grace period is forwarded at once.

    Returns:
        True when installed; False when not possible here (not the main thread, no handler).
    """
    if grace_s <= 0 or threading.current_thread() is not threading.main_thread():
        return False
    original = signal.getsignal(signal.SIGTERM)
    if not callable(original):
        return False
    handler: Callable[[int, FrameType | None], object] = original
    pending: list[threading.Timer] = []

    def deferred(signum: int, frame: FrameType | None) -> None:
        if pending:  # impatient second SIGTERM: stop now
            handler(signum, frame)
            return
        logger.info("SIGTERM: serving %.1f s more so API workers can finish in-flight "
                    "requests", grace_s)
        timer = threading.Timer(grace_s, handler, args=(signum, None))
        timer.daemon = True
        pending.append(timer)
        timer.start()

    signal.signal(signal.SIGTERM, deferred)
    return True
