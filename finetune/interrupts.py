"""Ctrl-C and SIGTERM (a scheduler preempting the job) end a run cleanly, never in the middle of writing a
checkpoint.

The CLI turns SIGTERM into the KeyboardInterrupt that Ctrl-C raises (`termination_as_interrupt`), so both close
the run's files and print one line. A KeyboardInterrupt raised while Python runs a garbage-collector callback (jax
registers one) is printed as "Exception ignored" and dropped, and the run trained on to its end; so the handler also
records the signal, and the training and evaluation loops raise it again at their next step (`raise_if_requested`).
While orbax writes or finalises a checkpoint, a signal is held back and raised when that is done (`deferred`):
raised inside orbax, it printed orbax's thread tracebacks and could abort the process (`terminate called after
throwing`), and an interrupted deletion left more checkpoints than `train.keep_checkpoints`. Python has no such
guard of its own; signal handlers can only be set from the main thread, so elsewhere `deferred` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A second signal this soon after the first is the same request delivered twice (a terminal's Ctrl-C reaches a
# sweep's point and the sweep passes it on as SIGTERM; `scancel` signals every process of a job): raised again, it
# could interrupt the run's closing. A later one raises again, so a user can still break out of a stuck run.
_REPEAT_IGNORED_S = 2.0
# When the last interrupt was requested (time.monotonic), None when none is pending. Process-wide, as signals are.
_requested_at: list[float | None] = [None]


def _raise_interrupt(signum, frame) -> None:
  del signum, frame
  now, previous = time.monotonic(), _requested_at[0]
  if previous is not None and now - previous < _REPEAT_IGNORED_S:
    return
  _requested_at[0] = now
  raise KeyboardInterrupt


def raise_if_requested() -> None:
  """Raises KeyboardInterrupt if a signal came in `termination_as_interrupt` (a library may have dropped the first).
  The loops call it once per step."""
  if _requested_at[0] is not None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
  """Within the block, SIGTERM raises KeyboardInterrupt, as SIGINT does, and both are recorded for
  `raise_if_requested` (the CLI's commands run in it). An ignored SIGINT (a background job's) stays ignored."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  handled = [signal.SIGTERM] + ([signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler
                                else [])
  previous = {sig: signal.signal(sig, _raise_interrupt) for sig in handled}
  previous_hook = sys.unraisablehook

  def drop_recorded_interrupt(unraisable) -> None:
    # Python prints a dropped exception with its traceback ("Exception ignored in ..."); this one is raised again
    # by the loops, and the run ends with its one line.
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _requested_at[0] is not None):
      previous_hook(unraisable)

  sys.unraisablehook = drop_recorded_interrupt
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    # A hook installed on top of ours inside the block (checkpoint.py's filter of the reads orbax abandons, which
    # finish after the block) stays; ours then only passes unraisables on, as nothing is recorded.
    if sys.unraisablehook is drop_recorded_interrupt:
      sys.unraisablehook = previous_hook
    _requested_at[0] = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT/SIGTERM back until the block ends, then hands them to the handlers they had. Signals that were
  ignored or left to the operating system (SIG_IGN, SIG_DFL) are not touched."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
  held: list[int] = []
  for sig, handler in previous.items():
    if callable(handler):
      signal.signal(sig, lambda signum, frame: held.append(signum))
  try:
    yield
  finally:
    for sig, handler in previous.items():
      if callable(handler):
        signal.signal(sig, handler)
    for signum in held[:1]:  # one interrupt is enough
      previous[signum](signum, None)
