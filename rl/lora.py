"""LoRA settings shared by the learner (which trains the adapters) and the rollout workers (which,
with the collective weight sync, run the same adapters unmerged): one parser, so both build the
same LoraConfig and the adapter tensors carry the same names on both sides."""
from __future__ import annotations

from rl.errors import fail
from rl.models.llada_v import LORA_TARGETS as LLADA_V_LORA_TARGETS

# LLaDA's projections inside the blocks; a regex, because the bare name "ff_out" would also put an
# adapter on the untied LM head (model.transformer.ff_out). LLaDA-V's language model names them LLaMA's
# way; anchored at its model.layers, so the frozen SigLIP tower's own q_proj/... stay without adapters.
LORA_TARGETS = rf".*\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)|{LLADA_V_LORA_TARGETS}"
LORA_DEFAULTS = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": LORA_TARGETS}
LORA_ALIASES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}  # the names recipes use


def lora_config(lora: dict | None):
    """model.lora as a peft LoraConfig (None stays None); a bad value is an error naming the key."""
    if lora is None:
        return None
    from peft import LoraConfig

    if not isinstance(lora, dict):
        fail("model.lora", lora, "expected None or a dict of peft LoraConfig fields (r, lora_alpha, ...)")
    lora = dict(lora)
    for short, full in LORA_ALIASES.items():
        if short in lora:
            if full in lora:
                fail(f"model.lora.{short}", lora[short], f"expected alone, not with lora.{full} (the same setting)")
            lora[full] = lora.pop(short)
    kw = {**LORA_DEFAULTS, **lora}
    if not isinstance(kw["r"], int) or isinstance(kw["r"], bool) or kw["r"] < 1:
        fail("model.lora.r", kw["r"], "expected an integer >= 1")
    try:
        return LoraConfig(**kw)
    except TypeError as e:
        raise ValueError(f"model.lora: expected peft LoraConfig fields ({e})") from None
