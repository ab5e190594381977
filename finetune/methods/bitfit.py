"""BitFit (Ben Zaken et al. 2022): train the bias terms only (plus `config.peft.modules_to_save`, e.g. the head).

Nothing is injected: the method only says which base parameters train. The trained model is a plain model, so
merging is the identity and `finetune export --format hf` works unchanged.
"""

from __future__ import annotations

from finetune import adapters


def _no_injection(model, peft_cfg, rngs) -> None:
  del model, peft_cfg, rngs


adapters.PEFT_METHODS.register("bitfit")(adapters.PeftMethod(
    inject=_no_injection, trains_base=lambda path: path.endswith("/bias"), targets="ignored",
    merge=lambda abstract, params, model_state: (params, model_state)))
