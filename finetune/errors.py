"""The one exception type that means "the user asked for something that cannot work".

The CLI turns a `FinetuneError` into a single line `finetune: error: <message>` on stderr and exit status 2,
with no traceback. Every message names what is wrong and how to fix it. Anything else escaping the library is a
bug in `finetune` and keeps its traceback.
"""


class FinetuneError(Exception):
  """A user error: bad config key or value, unknown name, missing file, unreadable checkpoint, non-finite loss."""
