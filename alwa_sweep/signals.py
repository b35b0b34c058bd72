"""SIGTERM / SIGINT / SIGHUP as an exception, so that ``finally`` blocks run.

By default SIGTERM and SIGHUP kill Python without running ``finally`` blocks or
``with`` exits: an MLflow run stays RUNNING, a lock file or a Ray session stays behind.
Inside ``with terminate_on_signals():`` each of these signals raises
:class:`Terminated` in the main thread instead, wherever it is executing, so cleanup
code (``finally``, ``__exit__``) runs and can end the run as KILLED with the reason
``str(exc)`` ("terminated by SIGTERM").

Policy:

- **The first signal** raises ``Terminated(signum)``. ``exc.exit_code`` is
  ``128 + signum`` (the shell convention: 143 for SIGTERM, 130 for SIGINT, 129 for
  SIGHUP); the CLI should return it.
- **Further signals while cleaning up** (after the first, until the outermost
  ``terminate_on_signals`` block has exited) do **not** raise: a second Ctrl-C must not
  abort the ``finally`` that is finishing the MLflow run. Each one is counted
  (``Terminated.repeats`` of the pending exception) and a one-line note goes to stderr
  saying that cleanup is in progress and that SIGKILL (``kill -9``) stops at once.
- **Nesting** is safe: an inner block installs the same handlers and restores the
  outer block's on exit; the state (whether a signal has arrived) is shared, so a
  signal while inside both raises once. The outermost block restores the handlers that
  were there before (Python's ``KeyboardInterrupt`` handler for SIGINT, the default for
  the others) and resets the state.
- **Threads**: Python runs signal handlers in the main thread only. Outside the main
  thread ``terminate_on_signals()`` installs nothing and does nothing (it is a no-op,
  documented rather than an error, so library code can use it anywhere).
- A library that installs its own handler inside the block (``ray.init`` installs one
  for SIGTERM in the driver) replaces ours until the block ends; enter a nested
  ``terminate_on_signals()`` after such a call to take the signals back.
"""

from __future__ import annotations

import contextlib
import os
import sys
import signal
import threading
from typing import Iterator

from trainers.errors import Interrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Terminated(Interrupted):
    """A termination signal arrived; raised in the main thread by the handler.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception`` blocks
    do not swallow it; an :class:`~trainers.errors.Interrupted`, so the engine records
    the run as interrupted.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + self.signum
        self.repeats = 0
        BaseException.__init__(self, f"terminated by {self.signal_name}")

    @property
    def reason(self) -> str:
        """For an MLflow run's status reason: ``terminated by SIGTERM``."""
        return str(self)


class _State:
    depth = 0
    pending: Terminated | None = None
    deferred: Terminated | None = None  # to be raised at the next Python line (see _handler)


def _handler(signum, frame):
    if _State.pending is not None:
        _State.pending.repeats += 1
        _note(f"alwa-sweep: {signal.Signals(signum).name} received again; cleaning up after "
              f"{_State.pending.signal_name} (send SIGKILL, `kill -9 {os.getpid()}`, to stop at once)\n")
        return
    _State.pending = Terminated(signum)
    if _inside_extension_call(frame):
        # Raised here, the exception would surface inside a C extension's call (Ray's
        # Cython ``CoreWorker.wait`` polls for signals and returns a result anyway), which
        # CPython turns into ``SystemError: ... returned a result with an exception set``.
        # Raise it instead at the next Python line executed (or call made).
        _raise_at_next_line(_State.pending, frame)
        return
    raise _State.pending


# Python frames that call into C extensions which check for signals themselves and do
# not propagate an exception raised by a handler (Ray's core worker).
_DEFER_IN = (os.sep + "ray" + os.sep,)


def _inside_extension_call(frame) -> bool:
    return frame is not None and any(part in frame.f_code.co_filename for part in _DEFER_IN)


def _raise_at_next_line(exc: BaseException, frame) -> None:
    traced = []

    def tracer(f, event, arg):
        if event in ("call", "line", "return") and _State.deferred is exc:
            _State.deferred = None
            sys.settrace(None)
            for each in traced:
                each.f_trace = None
            raise exc
        return tracer

    _State.deferred = exc
    while frame is not None:  # line events in the frames already running, call events in new ones
        frame.f_trace = tracer
        frame.f_trace_lines = True
        traced.append(frame)
        frame = frame.f_back
    sys.settrace(tracer)


def _note(text: str) -> None:
    try:
        os.write(2, text.encode())  # no buffered I/O inside a signal handler
    except OSError:
        pass


@contextlib.contextmanager
def terminate_on_signals(signals=SIGNALS) -> Iterator[None]:
    """Within the block, ``signals`` raise :class:`Terminated` (see the module's policy)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, _handler)
    except BaseException:
        _restore(previous)
        raise
    _State.depth += 1
    try:
        yield
    finally:
        _State.depth -= 1
        outermost = _State.depth == 0
        _restore(previous)
        if outermost:
            _State.pending = None


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        # None: a handler installed from C, which cannot be reinstalled; use the default.
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def terminating() -> Terminated | None:
    """The pending :class:`Terminated` while cleaning up after a signal, else ``None``."""
    return _State.pending


@contextlib.contextmanager
def signals_noted_not_raised(signals=SIGNALS) -> Iterator[None]:
    """Within the block (cleanup after an interruption), ``signals`` only print a note:
    the cleanup that ends MLflow runs is not aborted by a second Ctrl-C or SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum, frame):
        _note(f"alwa-sweep: {signal.Signals(signum).name} received; cleaning up (send SIGKILL, "
              f"`kill -9 {os.getpid()}`, to stop at once)\n")

    previous = {}
    try:
        for signum in signals:
            previous[signum] = signal.signal(signum, note)
        yield
    finally:
        _restore(previous)
