"""The one exception type that means "the user asked for something that cannot work".

The CLI turns a `FinetuneError` into a single line `finetune: error: <message>` on stderr and exit status 2,
with no traceback. Every message names what is wrong and how to fix it. Anything else escaping the library is a
bug in `finetune` and keeps its traceback.
"""

import traceback


class FinetuneError(Exception):
  """A user error: bad config key or value, unknown name, missing file, unreadable checkpoint, non-finite loss."""


def raised_at(error: BaseException) -> str:
  """' (at FILE:LINE in FUNCTION)' of the innermost frame `error` was raised in, for one-line messages about a bug in
  a user's file (the CLI prints no traceback); '' when it has none."""
  # (not Python's import machinery, `<frozen importlib._bootstrap>`; a SyntaxError names its line itself)
  frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<")]
  if not frames or isinstance(error, SyntaxError):
    return ""
  frame = frames[-1]
  return f" (at {frame.filename}:{frame.lineno} in {frame.name})"
