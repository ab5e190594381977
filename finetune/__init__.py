"""finetune: transfer-learning research in JAX/Flax NNX, where every fine-tuning strategy is configuration.

The library entry points (the CLI calls exactly these):
    config = finetune.load_config('configs/mnist_transfer.py', ['train.steps=100'])
    summaries = finetune.train_and_evaluate(config, '/tmp/run')
"""

from finetune.config import build_config, load_config
from finetune.errors import FinetuneError

__all__ = ["build_config", "load_config", "train_and_evaluate", "FinetuneError"]


def __getattr__(name: str):
  # Imported on first use, not with the package: `finetune.cli` is imported through this package, and jax, which
  # train brings in, must load only after the CLI has installed its interrupt handling (a Ctrl-C during that import
  # was a traceback, or was swallowed and the run trained to the end).
  if name == "train_and_evaluate":
    from finetune.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  raise AttributeError(f"module 'finetune' has no attribute {name!r}")
