"""Peak memory per learner rank and per rollout worker, predicted from shapes and settings.

    python -m bench.memory [--model DIR | --config llada-8b|tiny|JSON] [--zero-stage 3] [--ranks 8]
        [--lora-r 128] [--group-size 6] [--prompts-per-rank 2] [--prompt-length 200] [--gen-length 256]
        [--estimator diffu_grpo] [--mu 12] [--gradient-checkpointing] [--offload none|optimizer|param]
        [--micro-batch 6] [--dtype bfloat16] [--device cuda] [--rollout-batch 0] [--table]

Prints one JSON object: learner.peak and rollout.peak ({bytes, gib, phase}), every component in
bytes, and which components each phase holds at once; --table also prints a readable table on
stderr. The learner peaks in one of five phases of an update, each the sum of its components:
  init            ZeRO-3 loading: the whole policy before DeepSpeed partitions it, or (full fine-
                  tuning) the whole reference, loaded after the policy's engine, before its own shards it.
  forward         the grad-enabled pass of an inner step after the first optimizer step (the optimizer
                  states then exist): saved activations, the logits and the log-softmax temporaries;
                  under ZeRO-3 the module running, gathered.
  backward_start  saved activations still held while backward goes through the log-softmax; under
                  ZeRO-3 the modules gathered for backward (parameter, gradient, prefetch).
  backward_end    gradients complete plus DeepSpeed's reduction buffers.
  step            gradients plus the optimizer's temporaries.
The no-grad old/reference passes hold less than the forward phase (no saved activations), so they
are not a phase of their own. Components outside every phase (offloaded_to_cpu, reference_on_cpu)
are host memory.

Model states follow DeepSpeed's own accounting (estimate_zero2/zero3_model_states_mem_needs:
bf16 = 2 bytes of 16-bit parameters + 18 bytes of 16-bit and fp32 gradients, fp32 master weights and
Adam moments per trainable parameter, partitioned by ZeRO); `deepspeed_estimate` reports their
functions' figures alongside. fp32 training (the CPU path) has no 16-bit copies: 4 bytes of weights,
4 of gradients and 8 of Adam moments, plus the fp32 partition DeepSpeed clones under ZeRO >= 1.

Activations are counted from rl/models/llada.py's forward, tensor by tensor, per token of the
forward's rows (views x rows x (prompt + answer)); see _block_saved. Logits are [rows, L, vocab]
in the model dtype (token_logps runs the head over the answer span only), and the log-softmax
(rl.estimators.token_logps) copies the scored rows to fp32 [N, vocab] and, on the policy's pass,
takes a softmax and its product with them for the entropy: three fp32 [N, vocab] at once. N is
every answer token of every row: UniGRPO's last inner step (mu >= 2) and d1's masking score them all.

The rollout worker holds the merged policy, Fast-dLLM's key/value cache (layers x 2 x rows x
kv_heads x (P+L) x head_dim; twice that for a moment when early stop drops rows, because
rollout.fast copies the kept rows before freeing the old cache) and one block's logits with the
sampler's float64 Gumbel and softmax temporaries.

Gradient checkpointing keeps one [tokens, d_model] input per block and recomputes one block at a time
in backward; offload=optimizer moves fp32 master weights, fp32 gradients and Adam moments to the
CPU (DeepSpeed's offload_optimizer); offload=param (ZeRO-3 only) moves the 16-bit partitions too.
Numbers fitted rather than derived are named as such: CPU_RUNTIME (allocator arenas, gloo and
oneDNN scratch, measured on the tiny model) and CUDA_CONTEXT.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 2**30
PRESETS = {
    # GSAI-ML/LLaDA-8B-Instruct config.json
    "llada-8b": dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                     vocab_size=126464, embedding_size=126464, weight_tying=False),
}
# Inner-step views per estimator (rl/estimators.py): coupled-GRPO scores a full-mask view plus the
# complementary pair (full_mask_view=True by default), SPG num_t=2 block views; the others one view.
VIEWS = {"unigrpo": 1, "diffu_grpo": 1, "coupled_grpo": 3, "wd1": 1, "spg": 2}
# DeepSpeed 0.19 ZeRO defaults (deepspeed/runtime/zero/config.py).
REDUCE_BUCKET = 500_000_000
ALLREDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
# Fitted on this machine's CPU with bench.memory_check (glibc's mmap threshold pinned) on the tiny
# model, where model states and activations are a few MB: what a learner adds whatever the model
# (small-object heap, autograd and oneDNN scratch, gloo buffers; ZeRO-3's hooks and coordinator more).
CPU_RUNTIME = {0: 30 * 2**20, 1: 30 * 2**20, 2: 30 * 2**20, 3: 85 * 2**20}
# What a CUDA process holds outside torch's allocator (context, cuBLAS/NCCL workspaces): typical
# H100/A100 figure with torch 2.x, not measured here.
CUDA_CONTEXT = int(0.75 * GIB)


@dataclass
class Settings:
    zero_stage: int = 0
    ranks: int = 1
    lora_r: int = 0  # 0 = full fine-tuning
    group_size: int = 8
    prompts_per_rank: int = 1
    prompt_length: int = 128
    gen_length: int = 256
    estimator: str = "unigrpo"
    mu: int = 4
    beta: float = 0.04  # > 0 loads a reference (a second copy without LoRA)
    gradient_checkpointing: bool = False
    offload: str = "none"  # none | optimizer | param
    micro_batch: int = 0  # batch rows per forward/backward; 0 = all of the rank's rows at once
    ref_device: str = "same"  # same | cpu: the reference whole in host memory (trainer.ref_device)
    dtype: str = "float32"  # float32 (CPU training) | bfloat16 (DeepSpeed bf16 mixed precision)
    device: str = "cpu"
    rollout_batch: int = 0  # rows per sampler call; 0 = the rank's rows (one worker per learner rank)
    block_length: int = 32
    cache: str = "dual"  # none | prefix | dual
    cfg_scale: float = 0.0
    early_stop: bool = True

    def __post_init__(self):
        if self.estimator not in VIEWS:
            raise ValueError(f"estimator: expected one of {sorted(VIEWS)}, got {self.estimator!r}")
        if self.offload not in ("none", "optimizer", "param"):
            raise ValueError(f"offload: expected none, optimizer or param, got {self.offload!r}")
        if self.offload == "param" and self.zero_stage != 3:
            raise ValueError("offload=param needs zero_stage=3 (DeepSpeed offloads parameters only under ZeRO-3)")
        if self.ref_device not in ("same", "cpu"):
            raise ValueError(f"ref_device: expected same or cpu, got {self.ref_device!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: expected float32 or bfloat16, got {self.dtype!r}")


# --- model shape ---------------------------------------------------------------------------------

def load_shape(model: str | None = None, config: str | None = None) -> dict:
    """Shape fields from a checkpoint directory, a preset name, a JSON file or a JSON literal."""
    if model:
        cfg = json.loads((Path(model) / "config.json").read_text())
    elif config in PRESETS:
        return dict(PRESETS[config])
    elif config == "tiny":
        from rl.models import TINY_CHECKPOINT
        cfg = json.loads((TINY_CHECKPOINT / "config.json").read_text())
    elif config and Path(config).is_file():
        cfg = json.loads(Path(config).read_text())
    elif config:
        cfg = json.loads(config)
    else:
        raise ValueError("give --model DIR or --config (a preset: llada-8b, tiny; a JSON file; a JSON object)")
    keys = ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size", "embedding_size",
            "weight_tying")
    return {k: cfg[k] for k in keys if cfg.get(k) is not None}


def _dims(shape: dict):
    d, H = shape["d_model"], shape["n_heads"]
    kvd = shape.get("n_kv_heads", H) * (d // H)  # key/value width
    V = shape.get("embedding_size") or shape["vocab_size"]
    return d, kvd, shape["mlp_hidden_size"], V, shape["n_layers"]


def param_counts(shape: dict, lora_r: int = 0) -> dict:
    """Parameters of LLaDAModelLM and of the LoRA adapters rl.learner puts on every block projection."""
    d, kvd, m, V, n = _dims(shape)
    block = 2 * d + d * d + 2 * d * kvd + d * d + 3 * d * m
    head = 0 if shape.get("weight_tying") else V * d
    base = V * d + n * block + d + head
    # r x in + out x r per adapted Linear: q, k, v, attn_out, ff_proj, up_proj, ff_out
    lora = n * lora_r * ((d + d) + 2 * (d + kvd) + (d + d) + 2 * (d + m) + (m + d))
    largest = max(V * d, d * m)
    return {"base": base, "lora": lora, "total": base + lora, "trainable": lora if lora_r else base,
            "largest_layer": largest}


# --- learner -------------------------------------------------------------------------------------

def _block_saved(d: int, m: int, a: int) -> int:
    """Bytes autograd keeps per token for one LLaDABlock (a = bytes of the model dtype), as counted
    with torch.autograd.graph.saved_tensors_hooks (tests/test_bench_memory.py checks it).

    RMSNorm normalises in fp32: in fp32 it keeps its input (the block input or the residual sum) and
    h*rsqrt; in bf16 the fp32 copy x.float() and the cast back instead (the bf16 input itself is then
    kept by nothing). Its output is kept once for the projections after it. RoPE multiplies by constant
    cos/sin, so it keeps nothing; SDPA keeps q, k and v (after repeat_interleave: d wide even with
    fewer key/value heads), its output (already in the layout attn_out reads, so the transpose is a
    view) and a logsumexp per head. The SwiGLU keeps gate, silu(gate), up and their product.
    """
    f = 4
    fp32 = a == f
    norm = (0 if fp32 else f * d) + (f * d if fp32 else a * d) + a * d
    inputs = 2 * a * d if fp32 else 0  # block input and residual sum, kept by the two norms in fp32
    return 2 * norm + 4 * a * d + 4 * a * m + inputs


def _learner(shape: dict, s: Settings) -> dict:
    d, kvd, m, V, n_layers = _dims(shape)
    pc = param_counts(shape, s.lora_r)
    N, Nt = pc["total"], pc["trainable"]
    bf16 = s.dtype == "bfloat16"
    pb = 2 if bf16 else 4
    z, ranks = s.zero_stage, s.ranks
    shard = ranks if z >= 1 else 1  # optimizer states and master weights
    gshard = ranks if z >= 2 else 1  # gradients
    pshard = ranks if z == 3 else 1  # parameters
    # the clipped-ratio estimators (rl.estimators.ClippedGRPO) score pi_old and, with beta > 0, pi_ref
    needs_old = s.estimator in ("unigrpo", "diffu_grpo", "coupled_grpo")
    needs_ref = needs_old and s.beta > 0
    c: dict[str, int] = {}
    offload_opt = s.offload in ("optimizer", "param")

    c["policy_params"] = 0 if s.offload == "param" else pb * N // pshard
    c["reference_params"] = pb * N // pshard if needs_ref and not s.lora_r else 0
    if c["reference_params"] and s.ref_device == "cpu" and s.device != "cpu":
        c["reference_params"], c["reference_on_cpu"] = 0, pb * N
    if s.device == "cpu" and z != 3 and c["reference_params"]:
        # On the CPU the unsharded reference stays memory-mapped from its safetensors file, and an
        # embedding lookup reads only the rows of the tokens in the batch: the rest is never resident.
        c["reference_params"] -= pb * V * d
    # fp32 master: DeepSpeed's bf16 optimizers always keep one; in fp32, ZeRO >= 1 still clones its partition.
    master = 4 * Nt // shard if (bf16 or z >= 1) else 0
    adam = 8 * Nt // shard
    if bf16:
        grads = (2 + 4) * Nt // gshard if z < 3 else 4 * Nt // ranks  # 16-bit grads + fp32 accumulation
    else:
        grads = 4 * Nt // gshard
    c["master_weights"] = 0 if offload_opt else master
    c["optimizer_states"] = 0 if offload_opt else adam
    c["gradients"] = 0 if offload_opt and z >= 1 else grads
    if offload_opt:
        c["offloaded_to_cpu"] = master + adam + grads + (pb * N // pshard if s.offload == "param" else 0)
    on_cpu = s.device == "cpu"
    if z == 0:
        # engine.allreduce_gradients flattens the gradients into buckets before all-reducing them
        c["comm_buffer"] = (4 if not bf16 else 2) * min(Nt, ALLREDUCE_BUCKET) if ranks > 1 else 0
    elif z in (1, 2):
        c["comm_buffer"] = (2 if bf16 else 4) * (min(Nt, REDUCE_BUCKET) if on_cpu else REDUCE_BUCKET)
    else:
        # The IPG bucket is torch.empty(reduce_bucket_size), kept for the whole run: fully allocated on a
        # GPU, resident on the CPU as far as gradients have filled it. Reducing it, reduce_scatter_coalesced
        # (deepspeed/runtime/comm/coalesced_collectives.py) concatenates the bucket's partitions into a
        # flat copy first.
        gb = 2 if bf16 else 4
        c["comm_buffer"] = gb * (min(Nt, REDUCE_BUCKET) if on_cpu else REDUCE_BUCKET)
        c["reduce_scatter_copy"] = gb * min(Nt, REDUCE_BUCKET)
        # the module running (its parameter, and its gradient in backward) and those prefetched after it
        c["gathered_params"] = pb * (2 * pc["largest_layer"] + min(PREFETCH_BUCKET, N))
        c["running_module"] = pb * pc["largest_layer"]  # forward: the module running, gathered
    # The optimizer's step: torch AdamW (CPU) loops over its tensors making two temporaries of each
    # (sqrt of the second moment, its scaled copy); under ZeRO >= 1 its one tensor is the flat partition.
    # DeepSpeed's fused CUDA Adam makes none.
    step_tensor = Nt // shard if z >= 1 else pc["largest_layer"] if not s.lora_r else max(d, m) * s.lora_r
    c["step_temporaries"] = 2 * 4 * step_tensor if on_cpu else 0

    # activations of one forward/backward
    rows = s.group_size * s.prompts_per_rank
    micro = min(s.micro_batch or rows, rows)
    R = VIEWS[s.estimator] * micro
    T = s.prompt_length + s.gen_length
    tokens = R * T
    per_block = _block_saved(d, m, pb)
    f = 4
    # ln_f as one norm (its input kept in fp32); the head keeps ln_f's output
    tail = (f * d if pb == f else f * d + pb * d) + pb * d + (pb * d if pb == f else 0)
    if s.gradient_checkpointing:
        c["activations"] = tokens * (n_layers * pb * d + tail + per_block)
    else:
        c["activations"] = tokens * (n_layers * per_block + tail)
    scored = R * s.gen_length
    # the head runs over the answer span only (token_logps' logits_span): [rows, L, vocab]
    c["logits"] = R * s.gen_length * V * pb + 3 * scored * V * f
    # backward through the log-softmax: the kept fp32 rows, gather's and logsumexp's gradients of them,
    # and exp(x - lse): four fp32 [N, vocab] (the logits themselves are already freed)
    c["logits_backward"] = 4 * scored * V * f
    if s.micro_batch and micro < rows and z < 3:
        # held by the later micro-batches' forwards (under ZeRO-3 the partition is persistent anyway)
        c["accumulated_gradients"] = c["gradients"]
    if on_cpu:
        c["runtime"] = CPU_RUNTIME[z]
    else:
        c["runtime"] = CUDA_CONTEXT

    persistent = ["policy_params", "reference_params", "master_weights", "optimizer_states", "runtime"]
    if z == 3:
        persistent += ["comm_buffer"]
        if not offload_opt:
            persistent.append("gradients")  # the flat fp32 gradient partition exists from init on
    phases = {
        "forward": persistent + ["activations", "logits"]
        + [k for k in ("running_module", "accumulated_gradients") if k in c],
        "backward_start": persistent + ["activations", "logits_backward"] + (["gathered_params"] if z == 3 else []),
        "backward_end": persistent + (["reduce_scatter_copy", "gathered_params"] if z == 3
                                      else ["gradients", "comm_buffer"]),
        "step": persistent + ([] if z == 3 else ["gradients"]) + ["step_temporaries"],
    }
    # Loading: rl.learner loads the whole model on every rank before deepspeed.initialize shards it,
    # and under ZeRO-3 loads the whole reference after the policy's engine exists.
    c["unsharded_load"] = pb * N if z == 3 else 0
    if z == 3:
        # LoRA (no reference copy): the policy loads whole before any engine exists
        phases["init"] = ([k for k in persistent if k != "comm_buffer"] if c["reference_params"] else ["runtime"]) \
            + ["unsharded_load"]
    phases = {name: sorted(set(keys), key=keys.index) for name, keys in phases.items()}
    totals = {name: sum(c[k] for k in keys) for name, keys in phases.items()}
    peak = max(totals, key=totals.get)
    return {"components": c, "phases": phases, "phase_totals": totals,
            "peak": {"bytes": totals[peak], "gib": round(totals[peak] / GIB, 3), "phase": peak},
            "params": pc, "needs_old": needs_old, "needs_ref": needs_ref,
            "deepspeed_estimate": _deepspeed_estimate(pc, s)}


def _deepspeed_estimate(pc: dict, s: Settings) -> dict | None:
    """DeepSpeed's own model-states figures (mixed precision only: they assume 16-bit parameters)."""
    if s.dtype != "bfloat16" or s.zero_stage == 0:
        return None
    # DeepSpeed's logger writes to the stdout it finds at import, which carries this module's JSON
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    offload = s.offload != "none"
    if s.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            pc["trainable"], pc["largest_layer"], num_gpus_per_node=s.ranks, cpu_offload=offload,
            cpu_offload_params=s.offload == "param", zero_init=True, additional_buffer_factor=1.0)
        frozen = 2 * (pc["total"] - pc["trainable"]) // s.ranks
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(pc["trainable"], num_gpus_per_node=s.ranks,
                                                         cpu_offload=offload, additional_buffer_factor=1.0)
        frozen = 2 * (pc["total"] - pc["trainable"])
    return {"gpu_bytes": gpu + frozen, "cpu_bytes": cpu, "note": "trainable params through DeepSpeed's "
            "function (additional_buffer_factor=1), frozen LoRA base added at 2 bytes (/ ranks under ZeRO-3)"}


# --- rollout -------------------------------------------------------------------------------------

def _rollout(shape: dict, s: Settings) -> dict:
    d, kvd, m, V, n_layers = _dims(shape)
    pc = param_counts(shape, 0)
    pb = 2 if s.dtype == "bfloat16" else 4
    rows = (s.rollout_batch or s.group_size * s.prompts_per_rank) * (2 if s.cfg_scale else 1)
    T = s.prompt_length + s.gen_length
    c = {"params": pb * pc["base"]}
    kv = n_layers * 2 * rows * kvd * T * pb
    c["kv_cache"] = kv if s.cache != "none" else 0
    # early stop copies the kept rows' cache before the old one is freed
    c["kv_cache_copy"] = kv if s.cache != "none" and s.early_stop else 0
    # one layer of the full pass: normed input, q/k/v, rope fp32 temporaries, attention output, SwiGLU
    c["layer_transient"] = rows * T * (pb * (4 * d + 2 * kvd) + 4 * 3 * d + pb * 3 * m)
    # dual cache: each window call rebuilds one layer's full-length keys/values with torch.cat
    c["window_cat"] = 2 * rows * kvd * T * pb if s.cache != "none" else 0
    # one block's logits (every pass asks for logits_span = the block), then float64 copies for the
    # Gumbel noise and the confidence softmax (rollout.sampler.sample_tokens, score_tokens)
    c["sampler_logits"] = rows * s.block_length * V * (pb + 3 * 8)
    c["runtime"] = CPU_RUNTIME[0] if s.device == "cpu" else CUDA_CONTEXT
    phases = {
        "first_pass": ["params", "kv_cache", "layer_transient", "runtime"],
        "sampling": ["params", "kv_cache", "window_cat", "sampler_logits", "runtime"],
        "early_stop": ["params", "kv_cache", "kv_cache_copy", "runtime"],
    }
    totals = {name: sum(c[k] for k in keys) for name, keys in phases.items()}
    peak = max(totals, key=totals.get)
    return {"components": c, "phases": phases, "phase_totals": totals, "rows": rows,
            "peak": {"bytes": totals[peak], "gib": round(totals[peak] / GIB, 3), "phase": peak}}


def plan(shape: dict, s: Settings) -> dict:
    return {"shape": shape, "settings": asdict(s), "learner": _learner(shape, s), "rollout": _rollout(shape, s)}


def table(p: dict) -> str:
    lines = []
    for part in ("learner", "rollout"):
        r = p[part]
        peak = r["peak"]["phase"]
        lines.append(f"{part}: peak {r['peak']['gib']:.2f} GiB in phase {peak!r}")
        for k, v in r["components"].items():
            mark = "*" if k in r["phases"][peak] else " "
            lines.append(f"  {mark} {k:<22} {v / GIB:10.3f} GiB")
        lines.append("    phases: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in r["phase_totals"].items()))
    ds = p["learner"].get("deepspeed_estimate")
    if ds:
        lines.append(f"deepspeed model-states estimate: {ds['gpu_bytes'] / GIB:.2f} GiB per GPU, "
                     f"{ds['cpu_bytes'] / GIB:.2f} GiB CPU")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a checkpoint directory (its config.json)")
    src.add_argument("--config", help="preset (llada-8b, tiny), JSON file or JSON object of LLaDAConfig shapes")
    ap.add_argument("--table", action="store_true", help="also print a readable table on stderr")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            ap.add_argument(flag, type=type(value), default=value)
    args = vars(ap.parse_args(argv))
    shape = load_shape(args.pop("model"), args.pop("config"))
    show = args.pop("table")
    p = plan(shape, Settings(**args))
    print(json.dumps(p, indent=1))
    if show:
        print(table(p), file=sys.stderr)


if __name__ == "__main__":
    main()
