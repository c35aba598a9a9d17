"""Build the shipped tiny LLaDA-V: a tiny SigLIP tower, LLaDA-V's mlp2x_gelu projector and the tiny LLaDA,
trained with LLaDA-V's recipe in miniature.

    python -m recipes.build_tiny_llada_v [--out DIR]

1. Vision tower: a tiny SigLIP pre-trained with SigLIP's sigmoid loss on rendered scenes and their captions
   (recipes/siglip_tower.py); it reads real pixels (32x32 scenes, 4x4 patches: 64 features per image).
2. Assembly in GSAI-ML/LLaDA-V's layout (rl/models/llada_v.py): the tiny LLaDA's weights under LLaDA-V's
   LLaMA-style names, the tower under model.vision_tower.vision_tower.vision_model, a fresh projector. The
   tokenizer gains the scene words (rl/data/shapes.py WORDS), as the tiny MMaDA's did.
3. Stage 1, alignment (LLaDA-V's first stage): only the projector trains, on captioning (a scene -> its caption).
4. Stage 2, everything (LLaDA-V's later stages; the tower stays frozen here, as it is for RL): captioning,
   image-conditioned counting (<think>shape list</think><answer>n</answer>, a `--careless` share of answers
   off by one after a correct list, so a correctness reward has something to fix) and the text tasks.

Prompts use LLaDA-V's conversation template (its system message, LLaDA's chat format, "<image>\\n" before the
question). build_info.json records held-out counting accuracy, shape-list accuracy and arithmetic accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from recipes.build_tiny_llada import ANSWER_LENGTHS, careless, exact_answer
from recipes.build_tiny_mmada import QA_LENGTH, list_correct, off_by_one
from recipes.siglip_tower import pretrain
from rl.data import shapes
from rl.data.encode import encode_answers, encode_image_prompts
from rl.data.loader import attach_pixels
from rl.data.tasks import make_rows
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rl.models.llada_v import LLaDAVConfig, LLaDAVModelLM
from rl.sft import sft_loss
from rollout.fast import FastSamplerConfig
from rollout.rollout import WithImages, rollout

TINY_V = TINY_CHECKPOINT.parent / "tiny-llada-v"
MIX = {"caption": 0.25, "shapes_qa": 0.55, "text": 0.2}
CAPTION_PROMPT = "Describe the picture."
CAPTION_LENGTH = 24  # a three-shape caption is up to ~22 tokens with its end token
EVAL_TEXT = FastSamplerConfig(gen_length=QA_LENGTH, block_length=16, steps=QA_LENGTH, temperature=0.9)
# tiny-llada's names -> LLaDA-V's (the published checkpoint's LLaMA-style names)
BLOCK_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}


def assemble(lm, tok, tower, vision_config, seed: int) -> LLaDAVModelLM:
    """The tiny LLaDA (its vocabulary grown to the tokenizer's) with the tower and a fresh projector."""
    c = lm.config
    config = LLaDAVConfig(
        vocab_size=len(tok), hidden_size=c.d_model, intermediate_size=c.mlp_hidden_size,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
        max_position_embeddings=c.max_sequence_length, rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps,
        tie_word_embeddings=False, mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        vision_config=vision_config.to_dict(), mm_hidden_size=vision_config.hidden_size,
        mm_vision_tower="tiny-siglip", mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2,
        mm_vision_select_feature="patch", mm_patch_merge_type="flat", image_aspect_ratio="square",
        system_prompt=None)
    torch.manual_seed(seed)
    model = LLaDAVModelLM(config)
    old = lm.state_dict()
    wte = old["model.transformer.wte.weight"]
    head = old.get("model.transformer.ff_out.weight", wte)
    grow = len(tok) - wte.shape[0]
    g = torch.Generator().manual_seed(seed)
    new_rows = wte.mean(0, keepdim=True) + 0.02 * torch.randn(grow, wte.shape[1], generator=g)
    state = {"model.embed_tokens.weight": torch.cat([wte, new_rows]),
             "lm_head.weight": torch.cat([head, new_rows]),
             "model.norm.weight": old["model.transformer.ln_f.weight"]}
    for key, value in old.items():
        parts = key.split(".")
        if parts[:3] == ["model", "transformer", "blocks"]:
            state[f"model.layers.{parts[3]}.{BLOCK_NAMES[parts[4]]}.{parts[5]}"] = value
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower_state = tower.state_dict()
    for key in model.state_dict():
        if key.startswith(prefix):
            state[key] = tower_state[key[len(prefix):]]
    missing, unexpected = model.load_state_dict(state, strict=False)
    fresh = sorted(k for k in missing if not k.startswith("model.mm_projector."))
    if fresh or unexpected:
        raise RuntimeError(f"assembly left {fresh} unset and {unexpected} unused")
    model.freeze_vision_tower()
    return model


def caption_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        scene = shapes.make_scene(rng)
        rows.append({"prompt": CAPTION_PROMPT, "scene": scene, "solution": shapes.caption(scene), "mode": "mmu"})
    return rows


def image_batch(model, tok, rows: list[dict]):
    """Prompt ids, mask and the model bound to the rows' image features (tower run once, frozen)."""
    attach_pixels(rows, model.config.image_size, "build")
    ids, mask, pixels = encode_image_prompts(tok, rows, model.image_placeholder_ids, model.config.system_prompt)
    return ids, mask, WithImages(model, model.encode_images(pixels))


def sft_step(model, tok, mode: str, rng, text_rows, tokens: int, careless_p: float, gen):
    if mode == "text":
        L = rng.choices(list(ANSWER_LENGTHS), list(ANSWER_LENGTHS.values()))[0]
        rows = rng.sample(text_rows[L], max(2, tokens // (L + 40)))
        ids, mask, _ = encode_image_prompts(tok, rows, model.image_placeholder_ids, model.config.system_prompt)
        return sft_loss(model, ids, mask, encode_answers(tok, [r["solution"] for r in rows], L), tok.mask_token_id,
                        gen)
    if mode == "caption":
        rows, L = caption_rows(max(2, tokens // 110), rng), CAPTION_LENGTH
    else:
        rows = make_rows("shapes_qa", max(2, tokens // 120), rng.randrange(2**31), "train")
        rows = [off_by_one(r, rng) if rng.random() < careless_p else r for r in rows]
        L = QA_LENGTH
    ids, mask, policy = image_batch(model, tok, rows)
    return sft_loss(policy, ids, mask, encode_answers(tok, [r["solution"] for r in rows], L), tok.mask_token_id, gen)


@torch.no_grad()
def evaluate(model, tok, n: int, seed: int) -> dict:
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    qa = attach_pixels(make_rows("shapes_qa", n, seed, "val"), model.config.image_size, "val")
    batch = rollout(model, tok, qa, 1, EVAL_TEXT, gen, micro_batch=64)
    out["shapes_qa/accuracy"] = sum(exact_answer(batch.completions, qa)) / n
    out["shapes_qa/list_accuracy"] = sum(list_correct(batch.completions, qa)) / n
    captions = attach_pixels(caption_rows(n, random.Random(seed + 7)), model.config.image_size, "val")
    cap = FastSamplerConfig(gen_length=CAPTION_LENGTH, block_length=CAPTION_LENGTH, steps=CAPTION_LENGTH,
                            temperature=0.0)
    batch = rollout(model, tok, captions, 1, cap, gen, micro_batch=64)
    out["caption/exact"] = sum(c.strip() == r["solution"] for c, r in zip(batch.completions, captions)) / n
    arith = make_rows("arithmetic", n, seed, "val")
    batch = rollout(model, tok, arith, 1, EVAL_TEXT, gen, micro_batch=64)
    out["arithmetic/accuracy"] = sum(exact_answer(batch.completions, arith)) / n
    model.train(was)
    return out


def train(model, tok, params, steps: int, lr: float, warmup: int, mix: dict, args, rng, gen, text_rows, history,
          stage: str, t0: float):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    ema = {}
    model.train()
    for step in range(1, steps + 1):
        mode = rng.choices(list(mix), list(mix.values()))[0]
        loss = sft_step(model, tok, mode, rng, text_rows, args.tokens_per_batch, args.careless, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        ema[mode] = loss.item() if mode not in ema else 0.95 * ema[mode] + 0.05 * loss.item()
        if step % 50 == 0:
            losses = " ".join(f"{k} {v:.3f}" for k, v in sorted(ema.items()))
            print(f"{stage} step {step} {losses} lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s", flush=True)
        if step == steps or (stage == "stage2" and step % args.eval_every == 0):
            res = evaluate(model, tok, args.eval_rows, args.seed)
            history.append({"stage": stage, "step": step, **{k: round(v, 4) for k, v in res.items()},
                            "elapsed_s": round(time.time() - t0)})
            print("eval", json.dumps(history[-1]), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_V)
    ap.add_argument("--init", type=Path, default=TINY_CHECKPOINT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tower-steps", type=int, default=800)
    ap.add_argument("--align-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--align-lr", type=float, default=2e-3)
    ap.add_argument("--tokens-per-batch", type=int, default=3072)
    ap.add_argument("--careless", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng, gen = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    t0 = time.time()

    tower, vision_config, top1 = pretrain(args.tower_steps, args.seed)
    lm, tok = load_checkpoint(args.init)
    tok.add_tokens(list(shapes.WORDS))
    model = assemble(lm, tok, tower, vision_config, args.seed)
    noise = random.Random(args.seed + 1)
    rows = [careless(r, noise) if r["task"] == "arithmetic" and noise.random() < args.careless else r
            for task in ("arithmetic", "countdown") for r in make_rows(task, 20000, args.seed, "train")]
    need = [len(ids) + 1 for ids in tok([r["solution"] for r in rows], add_special_tokens=False)["input_ids"]]
    text_rows = {L: [r for r, n in zip(rows, need) if n <= L] for L in ANSWER_LENGTHS}
    history = [{"stage": "tower", "siglip_top1_of_10": round(top1, 4), "elapsed_s": round(time.time() - t0)}]

    # Stage 1: the projector alone learns to put the tower's features where the LM reads captions.
    projector = list(model.model.mm_projector.parameters())
    model.requires_grad_(False)
    for p in projector:
        p.requires_grad_(True)
    train(model, tok, projector, args.align_steps, args.align_lr, 50, {"caption": 1.0}, args, rng, gen, text_rows,
          history, "stage1", t0)
    # Stage 2: projector and language model together (the tower stays as pre-trained).
    model.requires_grad_(True)
    model.freeze_vision_tower()
    params = [p for p in model.parameters() if p.requires_grad]
    train(model, tok, params, args.steps, args.lr, 100, MIX, args, rng, gen, text_rows, history, "stage2", t0)
    save(model, tok, args, history)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


def save(model, tok, args, history):
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    info = {"recipe": "python -m recipes.build_tiny_llada_v", "init": "recipes/assets/tiny-llada", "mix": MIX,
            "careless": args.careless, "lr": args.lr, "align_lr": args.align_lr, "seed": args.seed,
            "tower_steps": args.tower_steps, "align_steps": args.align_steps, "steps": args.steps,
            "params": sum(p.numel() for p in model.parameters()), "eval_text_sampler": vars(EVAL_TEXT),
            "history": history}
    (args.out / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
