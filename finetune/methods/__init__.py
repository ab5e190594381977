"""Fine-tuning methods: one file per method, each a few functions over parameter paths and pytrees.

`finetune.strategy.resolve_strategy` calls them to turn a stage's config into one resolved table (group,
trainable, learning rate) that the optimizer and the train step read; no method reaches into the train loop.
"""
