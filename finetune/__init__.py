"""finetune: transfer-learning research in JAX/Flax NNX, where every fine-tuning strategy is configuration.

The library entry points (the CLI calls exactly these):
    config = finetune.load_config('configs/mnist_transfer.py', ['train.steps=100'])
    summaries = finetune.train_and_evaluate(config, '/tmp/run')
"""

from finetune.config import build_config, load_config
from finetune.errors import FinetuneError
from finetune.train import train_and_evaluate

__all__ = ["build_config", "load_config", "train_and_evaluate", "FinetuneError"]
