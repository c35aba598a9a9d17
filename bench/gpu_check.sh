#!/usr/bin/env bash
# The GPU checks of issue 18 in one run, on a LLaDA-8B-shaped random-init model built here:
#   1. bench.memory: the planner's prediction for this machine and this run's settings
#   2. bench.learner: learner throughput/memory at LLaDA-8B size
#   3. bench.rollout: the samplers on the same model
#   4. rl.train: 3 UniGRPO steps with LoRA r=128 and gradient checkpointing, peak memory recorded
#
#   bash bench/gpu_check.sh                 # SCALE=full: one CUDA GPU, bf16, LLaDA-8B shapes
#   SCALE=tiny bash bench/gpu_check.sh      # the same steps on the CPU with a tiny random model
#
# Environment: SCALE (full | tiny), OUT_DIR (results; default ./gpu_check_out), WORK (where the
# model is built; default OUT_DIR/model), STEPS (a subset of "planner learner rollout train").
# Every step writes its output under OUT_DIR; the script stops at the first failing step.
# Expect, at full scale, ~16 GB of disk for the bf16 checkpoint and several minutes of loading.
set -euo pipefail

SCALE=${SCALE:-full}
OUT_DIR=${OUT_DIR:-gpu_check_out}
WORK=${WORK:-$OUT_DIR/model}
STEPS=${STEPS:-planner learner rollout train}
mkdir -p "$OUT_DIR"
MODEL="$WORK/llada-$SCALE"

case "$SCALE" in
  full)
    # PROMPT: an upper bound on the chat-templated arithmetic prompts, for the planner
    DEVICE=cuda DTYPE=bfloat16 SIZE=llada-8b GEN=256 PROMPT=128
    ROLLOUT=(--lengths 256 --block-length 32 --prompts 8 --runs 1 --timing-prompts 4 --batch 4)
    # rl.train gives the rollout worker and the learner a GPU each; on a one-GPU machine both
    # share it: Ray is told of two GPUs and leaves CUDA_VISIBLE_DEVICES alone.
    if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
      export RAY_OVERRIDE_RESOURCES='{"GPU": 2}' RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1
    fi
    ;;
  tiny)
    DEVICE=cpu DTYPE=float32 SIZE=tiny GEN=32 PROMPT=32
    ROLLOUT=(--lengths 16 --block-length 16 --prompts 2 --runs 1 --timing-prompts 2 --batch 2)
    ;;
  *) echo "SCALE: expected full or tiny, got '$SCALE'" >&2; exit 2 ;;
esac

# A random-init model with the shipped tokenizer: LLaDA-8B's shapes and vocabulary (126464; ids
# the tokenizer does not know decode to nothing), or a tiny one. Weights are created in the model
# dtype on the target device so 8B parameters never pass through fp32 host memory.
if [ ! -f "$MODEL/config.json" ]; then
  python - "$MODEL" "$SCALE" "$DEVICE" "$DTYPE" <<'EOF'
import sys

import torch

from bench.memory import PRESETS
from rl.models import TINY_CHECKPOINT, load_tokenizer
from rl.models.llada import LLaDAConfig, LLaDAModelLM

out, scale, device, dtype = sys.argv[1:]
tok = load_tokenizer(TINY_CHECKPOINT)
shape = PRESETS["llada-8b"] if scale == "full" else dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2,
                                                         mlp_hidden_size=192, vocab_size=1024)
torch.manual_seed(0)
torch.set_default_dtype(getattr(torch, dtype))
with torch.device(device):
    model = LLaDAModelLM(LLaDAConfig(**shape, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id, rope_theta=500000.0))
model.save_pretrained(out)
tok.save_pretrained(out)
print(f"built {out}: {sum(p.numel() for p in model.parameters()):,} parameters, {dtype}")
EOF
fi

for step in $STEPS; do
  echo "== $step" >&2
  case "$step" in
    planner)
      # The rl.train step below: one learner, 2 prompts x 6 answers, LoRA r=128, checkpointing on/off.
      for ckpt in gradient-checkpointing no-gradient-checkpointing; do
        python -m bench.memory --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --zero-stage 0 --ranks 1 \
          --lora-r 128 --group-size 6 --prompts-per-rank 2 --prompt-length "$PROMPT" --gen-length "$GEN" \
          --estimator unigrpo --mu 2 "--$ckpt" --table > "$OUT_DIR/memory_plan_$ckpt.json"
      done
      ;;
    learner)
      python -m bench.learner --device "$DEVICE" --dtype "$DTYPE" --sizes "$SIZE" $([ "$SCALE" = tiny ] && echo --repeats 1) \
        > "$OUT_DIR/learner.json"
      ;;
    rollout)
      if python -m bench.rollout --help | grep -q -- '--device'; then
        python -m bench.rollout --checkpoint "$MODEL" --device "$DEVICE" "${ROLLOUT[@]}" > "$OUT_DIR/rollout.json"
      else
        # bench.rollout runs on the CPU only: an 8B model there would take hours, so it runs on its
        # default (the shipped tiny checkpoint) and says so in its output file name.
        python -m bench.rollout "${ROLLOUT[@]}" > "$OUT_DIR/rollout_cpu_tiny.json"
      fi
      ;;
    train)
      # Peak GPU memory: sampled from nvidia-smi while the run lasts (Ray actors are other processes).
      if [ "$DEVICE" = cuda ]; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT_DIR/train_gpu_mem_mib.txt" &
        SMI=$!
        trap 'kill $SMI 2>/dev/null || true' EXIT
      fi
      python -m rl.train hydra.run.dir="$OUT_DIR/train" trainer.device="$DEVICE" model.path="$MODEL" \
        model.dtype="$DTYPE" model.gradient_checkpointing=true 'model.lora={r: 128, alpha: 64}' \
        algorithm=unigrpo algorithm.group_size=6 algorithm.mu=2 trainer.prompts_per_step=2 \
        trainer.total_steps=3 trainer.val_before_train=false trainer.val_every=0 trainer.save_every=0 \
        rollout.gen_length="$GEN" rollout.block_length=32 \
        'task.train={arithmetic: 64}' 'task.val={arithmetic: 4}' ray.num_cpus=4 > "$OUT_DIR/train.log" 2>&1 \
        || { tail -50 "$OUT_DIR/train.log" >&2; exit 1; }
      if [ "$DEVICE" = cuda ]; then
        kill $SMI
        echo "train peak GPU memory (MiB, nvidia-smi): $(sort -n "$OUT_DIR/train_gpu_mem_mib.txt" | tail -1)" >&2
      fi
      ;;
    *) echo "STEPS: unknown step '$step' (expected planner learner rollout train)" >&2; exit 2 ;;
  esac
done
echo "gpu_check ($SCALE) done: $OUT_DIR" >&2
