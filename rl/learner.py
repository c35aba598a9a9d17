"""The learner: one process per rank holds the policy in a DeepSpeed engine and runs policy_update.

Plain Python on top of torch.distributed and DeepSpeed (no Ray): a thin actor wraps one Learner per
rank. Every method below except the constructor's argument checks is collective: all ranks call it
in the same order, as torch.distributed and DeepSpeed require.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig

from rl.batch import RolloutBatch
from rl.config import OptimConfig, build, check_memory
from rl.errors import fail
from rl.estimators import build_estimator
from rl.lora import lora_config as _check_lora
from rl.models import check_checkpoint_dir, load_model, load_tokenizer
from rl.update import policy_update
from rl.weight_sync import WeightGroup, listen
from rollout.rollout import WithImages

METRICS = ("pg_loss", "pg_clipfrac", "ppo_kl", "kl_loss", "entropy", "grad_norm", "skipped_steps", "lr")
CHECKPOINT_TAG = "learner"


def _ds_config(zero_stage: int, optim: OptimConfig, cpu: bool, bf16: bool, offload: str = "none") -> dict:
    lr = optim.lr
    zero = {"stage": zero_stage}
    # ZeRO-Offload (CUDA only, rl.config.check_memory): with torch_adam off, DeepSpeed runs the step with
    # its DeepSpeedCPUAdam (the "cpu_adam" C++ op, built on first use) on the CPU-held fp32 states; a
    # torch optimizer would need zero_force_ds_cpu_optimizer=false and be far slower there.
    if offload in ("optimizer", "param"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload == "param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        # Nominal sizes: DeepSpeed requires them, but batches are fed by update(), not its dataloader,
        # and each backward is its own step (no gradient accumulation across inner steps).
        "train_micro_batch_size_per_gpu": 1,
        # (micro-batches within one inner step mark the boundary themselves, Learner._accumulate).
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay,
            # DeepSpeed's fused Adam is a CUDA kernel; torch's AdamW runs anywhere.
            "torch_adam": cpu}},
        # Constant after a linear warmup; a scheduler always exists so checkpoints have one shape.
        "scheduler": {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0 if optim.warmup_steps else lr, "warmup_max_lr": lr,
            "warmup_num_steps": max(optim.warmup_steps, 1), "warmup_type": "linear"}},
        "steps_per_print": 2**31 - 1,
    }


class _AdapterDisabled:
    """The frozen reference of a LoRA policy: the same engine with its adapters switched off."""

    def __init__(self, engine, peft_model):
        self.engine, self.peft_model = engine, peft_model

    def __call__(self, **inputs):
        with self.peft_model.disable_adapter():
            return self.engine(**inputs)


class Learner:
    """The policy (and its frozen reference) of one data-parallel rank.

    model_path: a local checkpoint directory (rl.models.load_model); its config gives the mask id.
    algorithm:  {"name": "unigrpo", "mu": 4, **estimator hyperparameters}; everything but name and mu
                goes to rl.estimators.build_estimator (e.g. eps, beta, kl, aggregation, T). mu defaults
                to 1. The reference model is loaded only when the estimator needs one (beta > 0).
    optim:      rl.config.OptimConfig, or a dict of its fields (omitted ones take its defaults).
    zero_stage: DeepSpeed ZeRO stage 0..3.
    lora:       None, or peft LoraConfig fields ("alpha"/"dropout" accepted for lora_alpha/lora_dropout);
                defaults {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "target_modules": LORA_TARGETS (every block projection, not the LM head)}.
                With LoRA the reference is the policy with its adapters disabled (no second copy).
    device:     "cpu" (gloo, fp32) or "cuda[:i]" (nccl); bf16=True trains in bf16 on CUDA (DeepSpeed's
                bf16 optimizer keeps fp32 master weights); weights load in that dtype whatever the checkpoint's.
    Memory options (rl.config.TrainerConfig, docs/MEMORY.md), checked by rl.config.check_memory:
    gradient_checkpointing: recompute each block in backward (LLaDAModelLM, non-reentrant).
    offload:    "none", "optimizer" (ZeRO >= 1) or "param" (ZeRO-3): ZeRO-Offload to the CPU, CUDA only.
    micro_batch: rows per forward/backward; 0 = the whole shard (rl.update.policy_update).
    ref_device: "same" or "cpu": the frozen reference in CPU memory while training on CUDA (not with LoRA).
    The process group is created on master_addr:master_port unless one already exists.

    Settings arrive checked by rl.config.validate (the driver's path); what a direct caller could
    still get wrong is checked here with the same code: optim through OptimConfig, the algorithm by
    build_estimator, LoRA by peft. rank and world_size are checked too, because a wrong pair makes
    init_process_group wait forever instead of failing.
    """

    def __init__(self, model_path: str, algorithm: dict, optim: dict, zero_stage: int, rank: int,
                 world_size: int, master_addr: str = "127.0.0.1", master_port: int = 29500,
                 lora: dict | None = None, seed: int = 0, device: str = "cpu", bf16: bool = False,
                 gradient_checkpointing: bool = False, offload: str = "none", micro_batch: int = 0,
                 ref_device: str = "same", config_overrides: dict | None = None):
        est_kwargs = dict(algorithm)
        name, self.mu = est_kwargs.pop("name"), est_kwargs.pop("mu", 1)
        self.optim = build(OptimConfig, optim, "trainer.optim.")
        lora_config = _check_lora(lora)
        if not isinstance(world_size, int) or world_size < 1:
            fail("world_size", world_size, "expected an integer >= 1")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            fail("rank", rank, f"expected an integer in [0, {world_size})")
        self.device = torch.device(device)
        if bf16 and self.device.type != "cuda":
            fail("bf16", bf16, "expected False on the CPU (fp32 training)")
        check_memory(device, zero_stage, offload, ref_device, lora)
        if not isinstance(micro_batch, int) or isinstance(micro_batch, bool) or micro_batch < 0:
            fail("micro_batch", micro_batch, "expected an integer >= 0 (rows per pass; 0 = the whole shard)")
        self.micro_batch = micro_batch
        build_estimator(name, **est_kwargs)  # before the model loads: a bad name or value costs nothing
        check_checkpoint_dir(model_path)
        self.config_overrides = dict(config_overrides or {})  # model.config_overrides
        self.mask_id = AutoConfig.from_pretrained(model_path, **self.config_overrides).mask_token_id
        self.estimator = build_estimator(name, **est_kwargs, mask_id=self.mask_id)

        self.model_path, self.rank, self.world_size = str(model_path), rank, world_size
        self.zero_stage, self.bf16, self.seed = zero_stage, bf16, seed
        self._owns_group = self._init_process_group(master_addr, master_port)
        self._weight_group, self._weight_sock = None, None  # rank 0's, to the rollout workers (open_weight_group)
        # ZeRO-3 shards each rank's own copy without broadcasting it, so randomly initialised weights
        # (LoRA's A matrices) must come out identical on every rank.
        torch.manual_seed(seed)

        # model.dtype, whatever the checkpoint stores. DeepSpeed casts a bf16 policy's module to bf16 before
        # it builds the fp32 masters from it, so loading bf16 loses nothing and halves host memory.
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        policy = load_model(model_path, self.dtype, **self.config_overrides)
        if gradient_checkpointing:
            # On the base model, before peft wraps it; non-reentrant, so LoRA's frozen inputs need no grad.
            policy.activation_checkpointing_enable({"use_reentrant": False})
        self.peft_model = None
        if lora_config is not None:
            from peft import get_peft_model

            policy = self.peft_model = get_peft_model(policy, lora_config)
        policy.to(self.device)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(
            model=policy, model_parameters=trainable,
            config=_ds_config(zero_stage, self.optim, self.device.type == "cpu", bf16, offload))
        self.ref, self.ref_device = None, None
        if self.estimator.needs_ref:
            if self.peft_model:
                self.ref = _AdapterDisabled(self.engine, self.peft_model)
            elif ref_device == "cpu" and self.device.type != "cpu":
                self.ref_device = torch.device("cpu")
                self.ref = self._load_reference(self.ref_device)
            else:
                self.ref = self._load_reference()

    def _init_process_group(self, addr: str, port: int) -> bool:
        local = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
        # DeepSpeed reads these even when the group already exists (LOCAL_RANK picks the device).
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK=str(local))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            # DeepSpeed's CPU shared-memory all-reduce is a C++ op compiled on first use (80 s on two
            # cores, again for every new venv path) and needs a compiler; gloo does the same reduction.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if dist.is_initialized():
            return False
        dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=self.world_size)
        return True

    def _load_reference(self, device: torch.device | None = None):
        """The frozen reference on the policy's device, or whole in CPU memory (device=cpu)."""
        ref = load_model(self.model_path, self.dtype, **self.config_overrides)
        ref = ref.to(device or self.device).eval().requires_grad_(False)
        if self.zero_stage != 3 or device is not None:
            return ref
        # Under ZeRO-3 the policy is sharded because it does not fit on one rank; neither does a
        # full reference, so it is sharded the same way (an optimizer-less engine).
        engine, *_ = deepspeed.initialize(model=ref, config={
            "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": self.bf16}, "steps_per_print": 2**31 - 1})
        engine.eval()
        return engine

    @property
    def module(self):
        """The LLaDAModelLM being trained (inside the peft wrapper when LoRA is on)."""
        return self.peft_model.get_base_model() if self.peft_model else self.engine.module

    # --- training -------------------------------------------------------------------------------

    def shard(self, batch: RolloutBatch) -> RolloutBatch:
        """This rank's rows: a contiguous run of whole groups."""
        B, G = len(batch), batch.group_size
        if B % G:
            fail("batch.group_size", G, f"expected a divisor of the batch size {B}")
        if (B // G) % self.world_size:
            fail("batch.groups", B // G, f"expected a multiple of world_size={self.world_size} (whole groups per rank)")
        n = B // self.world_size
        return batch.select(slice(self.rank * n, (self.rank + 1) * n)).own_images().to(self.device)

    def _accumulate(self, loss: torch.Tensor) -> None:
        """Backward of a micro-batch that is not an inner step's last: DeepSpeed keeps its gradients
        (and, off the boundary, neither reduces them across ranks nor steps); _step's backward, on the
        boundary again, adds the last micro-batch's and applies them. Losses arrive already weighted
        (rl.update.loss_share) and gradient_accumulation_steps is 1, so backward rescales nothing."""
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            self.engine.backward(loss)
        finally:
            self.engine.set_gradient_accumulation_boundary(True)

    def _step(self, loss: torch.Tensor) -> dict:
        self.engine.backward(loss)
        if self.zero_stage == 0 and not self.bf16:
            # Only DeepSpeed's ZeRO and bf16 optimizers skip a step on a non-finite grad norm; plain
            # fp32 clips and applies NaNs. Gradients are already all-reduced by backward(), so every
            # rank computes the same norm and takes the same branch.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                self.engine.zero_grad()
                self.engine.skipped_steps += 1  # as DeepSpeed counts it; the lr schedule does not tick
                return {"grad_norm": norm, "skipped_steps": 1.0}
            self.engine.step()
            return {"grad_norm": norm, "skipped_steps": 0.0}
        # ZeRO-1/2/3 and bf16: DeepSpeed all-reduces the norm of the partitioned gradients, discards
        # them when it is not finite, and skips both the optimizer and the lr scheduler step.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return {"grad_norm": float("nan") if norm is None else float(norm),
                "skipped_steps": float(not self.engine.was_step_applied())}

    def update(self, batch: RolloutBatch, seed: int) -> dict:
        """mu inner steps on this rank's share of `batch`; metrics averaged over ranks.

        The masking noise comes from (seed, rank), so an update is reproducible given its seed.
        skipped_steps counts inner steps whose optimizer step was skipped (non-finite grad norm).
        """
        part = self.shard(batch)
        policy, ref = self.engine, self.ref
        if part.pixels is not None:
            # LLaDA-V: the frozen vision tower once per prompt image, bound to both models as the rollout binds
            # it to its own; the G answers, the old, reference and policy passes and every micro-batch read
            # these features (each model applies its own projector).
            with torch.no_grad():
                features = self.module.encode_images(part.pixels)
            policy = WithImages(policy, features)
            ref = None if ref is None else WithImages(ref, features)
        generator = torch.Generator().manual_seed(seed * self.world_size + self.rank)
        self.engine.train()
        lr = float(self.engine.get_lr()[0])  # the rate this update starts with, not the next one's
        metrics = policy_update(policy, ref, self.estimator, part, self.mu, self.mask_id,
                                self._step, generator, self.micro_batch, self._accumulate, self.ref_device)
        metrics["lr"] = lr
        values = torch.tensor([metrics[k] for k in METRICS], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(values)
        return dict(zip(METRICS, (values / self.world_size).tolist()))

    @property
    def _comm_device(self):
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # --- weights --------------------------------------------------------------------------------

    def _gathered(self, params):
        if self.zero_stage != 3:
            return nullcontext()
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    def _rollout_tensors(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, tensor) of every weight a rollout worker runs, in LLaDAModelLM's key layout and a fixed
        order; collective (every rank draws every item). The tensor is rank 0's alone (None elsewhere)
        and valid only until the next item is drawn: ZeRO-3 shards are gathered one module at a time,
        so no rank ever holds two full copies. The single source of both state_dict_for_rollout and
        broadcast_weights, so the object store and the collective sync cannot send different weights.

        LoRA adapters are merged arithmetically (W + delta) into the yielded tensors only: merging
        in place and unmerging afterwards would leave rounding error in the trained base weights.
        """
        from peft.tuners.lora import LoraLayer

        lora_prefixes: list[str] = []
        for name, mod in self.module.named_modules():
            if any(name.startswith(p) for p in lora_prefixes):
                continue
            if isinstance(mod, LoraLayer):
                lora_prefixes.append(name + ".")
                with self._gathered(mod.parameters()):
                    w = None
                    if self.rank == 0:
                        with torch.no_grad():
                            w = mod.base_layer.weight
                            for adapter in mod.active_adapters:
                                w = w + mod.get_delta_weight(adapter).to(w.dtype)
                    yield f"{name}.weight", w
                continue
            own = list(mod.named_parameters(recurse=False))
            if own:
                with self._gathered(p for _, p in own):
                    for pname, p in own:
                        yield (f"{name}.{pname}" if name else pname), p.detach() if self.rank == 0 else None

    def _adapter_tensors(self) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, tensor) of the trainable LoRA tensors (lora_A/lora_B...), named as in the policy module
        (which is how peft.inject_adapter_in_model names them in a rollout worker's model); as
        _rollout_tensors: collective, the values rank 0's, each valid until the next is drawn."""
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                with self._gathered([p]):
                    yield name, p.detach() if self.rank == 0 else None

    def state_dict_for_rollout(self, adapters: bool = False) -> dict[str, torch.Tensor] | None:
        """Full fp32 CPU weights in LLaDAModelLM's key layout on rank 0 (None elsewhere), LoRA merged;
        collective. adapters=True (LoRA only): just the adapter tensors, for a rollout worker that
        runs them unmerged on the checkpoint's base weights (the collective sync's LoRA mode)."""
        if adapters and self.peft_model is None:
            fail("adapters", adapters, "expected False: this policy has no LoRA adapters")
        items = self._adapter_tensors() if adapters else self._rollout_tensors()
        out = {name: t.to("cpu", torch.float32, copy=True) for name, t in items if t is not None}
        return out if self.rank == 0 else None

    # --- the collective weight sync (rl/weight_sync.py; rl/actors.py drives it) -----------------

    def open_weight_group(self, addr: str) -> int:
        """Rank 0: listen on this node's `addr` for a new weight group (the last one is dropped) and
        give the port; the group forms in join_weight_group."""
        self.leave_weight_group()
        self._weight_sock = listen(addr)
        return self._weight_sock.getsockname()[1]

    def join_weight_group(self, size: int, timeout_s: float, prefix: str) -> None:
        """Rank 0: form the weight group (rank 0 of `size`) with the rollout workers, who join it at the
        same time; raises after timeout_s if one does not arrive."""
        sock, self._weight_sock = self._weight_sock, None
        try:
            self._weight_group = WeightGroup(sock.getsockname()[0], sock.getsockname()[1], 0, size, self.device,
                                             timeout_s, prefix, sock=sock)
        except BaseException:
            sock.close()
            raise

    def leave_weight_group(self) -> None:
        group, self._weight_group = self._weight_group, None
        if group is not None:
            group.close()
        sock, self._weight_sock = self._weight_sock, None
        if sock is not None:
            sock.close()

    def broadcast_weights(self, wire_dtype: str, bucket_mb: float) -> dict | None:
        """Collective over the learner ranks (ZeRO-3 gathers as state_dict_for_rollout does); rank 0
        broadcasts to the weight group: with LoRA the adapters only, otherwise the merged full weights.
        Rank 0 gives {"names", "bytes", "buckets"} of what it sent, the others None. If a send fails
        (a receiver died), rank 0 still draws every item, so the other ranks' gathers complete, then
        leaves the group (its peers' receives fail at once) and raises."""
        items = self._adapter_tensors() if self.peft_model is not None else self._rollout_tensors()
        group = self._weight_group
        if self.rank != 0:
            for _ in items:
                pass
            return None
        try:
            if group is None:
                raise RuntimeError("learner rank 0 is in no weight group (join_weight_group first)")
            stats = group.send(items, getattr(torch, wire_dtype), bucket_mb)
        except BaseException:
            for _ in items:
                pass
            self.leave_weight_group()
            raise
        return {"names": stats.names, "bytes": stats.bytes, "buckets": stats.buckets}

    def save(self, path: str | Path) -> None:
        """DeepSpeed checkpoint (weights, optimizer, lr schedule, all ZeRO shards) plus, from rank 0,
        a plain LLaDA export (LoRA merged) with the tokenizer in path/hf for inference."""
        path = Path(path)
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG)
        weights = self.state_dict_for_rollout()
        if self.rank == 0:
            self.module.save_pretrained(path / "hf", state_dict=weights)
            load_tokenizer(self.model_path).save_pretrained(path / "hf")
        dist.barrier()

    def load(self, path: str | Path) -> None:
        """Restore what save() wrote; training then continues exactly where it stopped."""
        if not (Path(path) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"no learner checkpoint in {str(path)!r} (expected {CHECKPOINT_TAG}/)")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {str(path)!r}")

    def close(self) -> None:
        """Leave the weight group; destroy the process group if this learner created it."""
        self.leave_weight_group()
        if self._owns_group and dist.is_initialized():
            dist.barrier()  # no rank tears the group down while a peer is still inside a collective
            # DeepSpeed's own call, so it also drops its cached clone of the world group and a later
            # Learner in this process can start a fresh one.
            deepspeed.comm.destroy_process_group()
        self._owns_group = False
