"""Atomic file writes: every file the framework writes appears whole or not at all.

A temp file with a unique name beside the target, renamed onto it (`os.replace` is atomic within one file
system): a crash never leaves a half-written file, and processes writing the same file at once (sweep points
sharing a source run, two sweeps tabulating one folder) never move each other's half-written temp into place.
Written by hand because the standard library has no atomic replace-write.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A unique temp path beside `path` to write to; renamed onto `path` when the block succeeds, removed if not."""
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", dir=os.path.dirname(os.path.abspath(path)))
  os.close(fd)
  os.chmod(tmp, 0o644)  # mkstemp makes it private; results are read by others
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
