"""Data sources (one file each, found by name in `SOURCES`) and the input pipeline that batches them."""

from finetune.registry import Registry

SOURCES = Registry("data source")

# Importing a source module registers it.
from finetune.data import digits  # noqa: E402,F401
from finetune.data import mnist  # noqa: E402,F401
from finetune.data import cifar10  # noqa: E402,F401
from finetune.data import hf_files  # noqa: E402,F401
from finetune.data import tfds  # noqa: E402,F401
from finetune.data import text  # noqa: E402,F401
from finetune.data import instructions  # noqa: E402,F401
from finetune.data import synthetic  # noqa: E402,F401
