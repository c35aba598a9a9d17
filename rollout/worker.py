"""Rollout worker: holds a copy of the policy and samples answers. The driver runs it as a Ray actor
(`ray.remote(RolloutWorker)`); the class itself is plain Python so it is tested directly."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

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
        self.device = device

    def pid(self) -> int:
        return os.getpid()

    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict, strict=True)

    def generate(self, rows: list[dict], group_size: int, seed: int, temperature: float | None = None) -> dict:
        """G answers per row; returns the batch tensors and texts (CPU) plus timing for throughput."""
        sampler = self.sampler if temperature is None else replace(self.sampler, temperature=temperature)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        batch = rollout(self.model, self.tokenizer, rows, group_size, sampler, gen, self.micro_batch, self.image_sampler)
        seconds = time.perf_counter() - t0
        return {
            "prompt_ids": batch.prompt_ids, "prompt_mask": batch.prompt_mask,
            "answer_ids": batch.answer_ids, "answer_mask": batch.answer_mask,
            "commit_step": batch.extras["commit_step"], "tokens_per_step": batch.extras["tokens_per_step"],
            "completions": batch.extras["completions"], "images": batch.extras["images"],
            "rows": batch.extras["rows"], "seconds": seconds,
        }
