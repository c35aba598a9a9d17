"""Rollout worker: holds a copy of the policy and samples answers. The driver runs it as a Ray actor
(`ray.remote(RolloutWorker)`); the class itself is plain Python so it is tested directly."""
from __future__ import annotations

import time
from dataclasses import fields, replace

import torch

from rl.batch import RolloutBatch
from rl.models import load_checkpoint
from rl.weight_sync import WeightGroup
from rollout.image import ImageSamplerConfig
from rollout.rollout import SAMPLERS, rollout, sampler_config
from rollout.sampler import SamplerConfig


def override_sampler(rollout_cfg: dict, override: dict) -> SamplerConfig:
    """The sampler of `rollout_cfg` (the rollout group) with `override`'s keys (e.g. gen_length, steps,
    sampler) in place of its own. When the override names another sampler, the keys only the old one
    takes are dropped (the rest of the rollout group still applies); a key that sampler does not take
    is an error."""
    merged = {**rollout_cfg, **override}
    cls = SAMPLERS.get(merged.get("sampler", "reference"))
    if cls is None:
        return sampler_config(merged)  # names the unknown sampler
    extra = sorted(set(override) - {f.name for f in fields(cls)} - {"sampler"})
    if extra:
        raise ValueError(f"sampler={merged['sampler']!r} takes no {extra}")
    return cls(**{f.name: merged[f.name] for f in fields(cls) if f.name in merged})


class RolloutWorker:
    def __init__(self, model_path: str, sampler: dict, threads: int = 1, device: str = "cpu", micro_batch: int = 0,
                 dtype: str = "float32", config_overrides: dict | None = None):
        """dtype: the weights' dtype (model.dtype; bfloat16 on CUDA); the learner's fp32 weights are cast
        into it by load_weights. config_overrides: model.config_overrides."""
        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_checkpoint(model_path, getattr(torch, dtype), **(config_overrides or {}))
        self.model.to(device).eval()
        self.device = device
        # The learner step whose update the weights come from (0: the checkpoint's), set by every path
        # that changes them: load_weights, receive_weights, and a restart's copy from a peer.
        self.version = 0
        self.adapter_names: list[str] = []  # LoRA tensors injected by add_adapters (collective sync)
        self.weight_group = None
        self.sampler_keys, self.sampler = sampler, sampler_config(sampler)
        self.image_sampler = ImageSamplerConfig(**(sampler.get("image") or {}))
        self.micro_batch = micro_batch

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def weights_version(self) -> int:
        return self.version

    def load_weights(self, state_dict: dict, version: int = 0) -> None:
        """Weights of learner step `version`: a full state dict of this model (LoRA merged, or with its
        injected adapters), or, after add_adapters, the adapter tensors alone (the base weights are the
        checkpoint's: LoRA never trains them)."""
        if self.adapter_names and set(state_dict) == set(self.adapter_names):
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in state_dict.items():
                    params[name].copy_(value)
        else:
            self.model.load_state_dict(state_dict, strict=True)
        self.version = version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights held now, on the CPU: what a restarted peer loads to match this worker."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def add_adapters(self, lora: dict) -> None:
        """Inject LoRA adapters (model.lora, the learner's LoraConfig) into the model in place, so the
        collective sync sends only them and the sampler runs them unmerged, as the learner computes its
        log-probs. lora_B starts at zero, so the model's output is unchanged until weights arrive.
        Idempotent."""
        if self.adapter_names:
            return
        from peft import inject_adapter_in_model

        from rl.lora import lora_config

        before = {name for name, _ in self.model.named_parameters()}
        inject_adapter_in_model(lora_config(lora), self.model)
        self.model.to(self.device).eval()
        # New names, less the wrapped layers' own weights (q_proj.weight is now q_proj.base_layer.weight).
        self.adapter_names = [name for name, _ in self.model.named_parameters()
                              if name not in before and ".base_layer." not in name]

    # ---- the collective weight sync (rl/weight_sync.py) -----------------------------------------
    def join_weight_group(self, addr: str, port: int, rank: int, size: int, timeout_s: float, prefix: str) -> None:
        """Join the group that learner rank 0 hosts at addr:port, as `rank` of `size` (the last group is
        dropped); returns once every member has joined, raises after timeout_s."""
        self.leave_weight_group()
        self.weight_group = WeightGroup(addr, port, rank, size, self.device, timeout_s, prefix)

    def leave_weight_group(self) -> None:
        group, self.weight_group = self.weight_group, None
        if group is not None:
            group.close()

    def receive_weights(self, version: int) -> dict:
        """One broadcast of learner rank 0's weights (the adapters only, after add_adapters), each cast to
        this model's dtype; then they are learner step `version`'s. On failure the group is dropped (a
        retried sync forms a new one) and the weights may be torn until the retry completes."""
        if self.weight_group is None:
            raise RuntimeError("this rollout worker is in no weight group (join_weight_group first)")
        try:
            stats = self.weight_group.receive(dict(self.model.named_parameters()))
        except BaseException:
            self.leave_weight_group()
            raise
        self.version = version
        return {"names": stats.names, "bytes": stats.bytes}

    def generate(self, rows: list[dict], group_size: int, seed: int, temperature: float | None = None,
                 sampler: dict | None = None) -> RolloutBatch:
        """G answers per row, on the CPU, with the generation's wall time (for throughput). `sampler`:
        keys for this call only (override_sampler), e.g. an evaluation's gen_length and steps."""
        sampler = override_sampler(self.sampler_keys, sampler) if sampler else self.sampler
        sampler = sampler if temperature is None else replace(sampler, temperature=temperature)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        batch = rollout(self.model, self.tokenizer, rows, group_size, sampler, gen, self.micro_batch,
                        self.image_sampler)
        return replace(batch.to("cpu"), seconds=time.perf_counter() - t0,
                       policy_version=torch.full((len(batch),), self.version))
