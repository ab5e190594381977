"""Ctrl-C and SIGTERM (a scheduler preempting the job) end a run cleanly, never in the middle of writing a
checkpoint.

The CLI turns SIGTERM into the KeyboardInterrupt that Ctrl-C raises (`termination_as_interrupt`), so both close
the run's files and print one line. While orbax writes or finalises a checkpoint, a signal is held back and raised
when that is done (`deferred`): raised inside orbax, it printed orbax's thread tracebacks and could abort the
process (`terminate called after throwing`), and an interrupted deletion left more checkpoints than
`train.keep_checkpoints`. Python has no such guard of its own; signal handlers can only be set from the main thread,
so elsewhere `deferred` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _raise_interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt


@contextlib.contextmanager
def termination_as_interrupt() -> Iterator[None]:
  """Within the block, SIGTERM raises KeyboardInterrupt, as SIGINT does (the CLI's commands run in it)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_interrupt)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


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
