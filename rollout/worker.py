"""Rollout worker: holds a copy of the policy and samples answers. The driver runs it as a Ray actor
(`ray.remote(RolloutWorker)`); the class itself is plain Python so it is tested directly."""
from __future__ import annotations

import time
from dataclasses import fields, replace

import torch

from rl.batch import RolloutBatch
from rl.models import load_checkpoint
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
        self.sampler_keys, self.sampler = sampler, sampler_config(sampler)
        self.image_sampler = ImageSamplerConfig(**(sampler.get("image") or {}))
        self.micro_batch = micro_batch
        self.version = 0  # the training step whose update produced the weights held now (0: the checkpoint's)

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def load_weights(self, state_dict: dict, version: int = 0) -> None:
        self.model.load_state_dict(state_dict, strict=True)
        self.version = version

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
