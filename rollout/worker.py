"""Rollout worker: holds a copy of the policy and samples answers. The driver runs it as a Ray actor
(`ray.remote(RolloutWorker)`); the class itself is plain Python so it is tested directly."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from rl.batch import RolloutBatch
from rl.models import load_checkpoint
from rollout.image import ImageSamplerConfig
from rollout.rollout import rollout, sampler_config


class RolloutWorker:
    def __init__(self, model_path: str, sampler: dict, threads: int = 1, device: str = "cpu", micro_batch: int = 0):
        torch.set_num_threads(threads)
        self.model, self.tokenizer = load_checkpoint(model_path)
        self.model.to(device).eval()
        self.sampler = sampler_config(sampler)
        self.image_sampler = ImageSamplerConfig(**(sampler.get("image") or {}))
        self.micro_batch = micro_batch

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    def generate(self, rows: list[dict], group_size: int, seed: int, temperature: float | None = None) -> RolloutBatch:
        """G answers per row, on the CPU, with the generation's wall time (for throughput)."""
        sampler = self.sampler if temperature is None else replace(self.sampler, temperature=temperature)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        batch = rollout(self.model, self.tokenizer, rows, group_size, sampler, gen, self.micro_batch,
                        self.image_sampler)
        return replace(batch.to("cpu"), seconds=time.perf_counter() - t0)
