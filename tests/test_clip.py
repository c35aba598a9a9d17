"""The CLIP reward: the shipped tiny CLIP, batching, the reward's NaN rule, errors, and a directory
with CLIP ViT-L/14's shape (scaled down in width and depth)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from recipes.build_tiny_clip import WORDS, build_processor, top1_of_10
from rewards.clip import TINY_CLIP, ClipScorer
from rewards.combine import WeightedReward
from rewards.registry import build_reward
from rewards.worker import RewardWorker
from rl.data import shapes
from rl.data.tasks import make_rows
from rl.models.vq import load_image_tokenizer

torch.set_num_threads(1)


def save_vit_l14_shaped_clip(path):
    """Random weights with ViT-L/14's patch 14 at 224 px, 77 text positions and 768-d projection; the
    processor resizes 32 px images up to 224 with OpenAI CLIP's mean/std."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = build_processor().tokenizer
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, eos_token_id=1, bos_token_id=0, pad_token_id=1)
    vision = dict(image_size=224, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)).save_pretrained(path)
    image = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPProcessor(image_processor=image, tokenizer=tok).save_pretrained(path)


@pytest.fixture(scope="module")
def scorer():
    return ClipScorer()


def test_shipped_clip_tells_captions_apart_on_held_out_scenes(scorer):
    rows = make_rows("t2i", 100, seed=5, split="val")
    result = top1_of_10(scorer, rows, seed=1)
    assert result["top1_of_10"] >= 0.8
    assert result["clip_score_matching"] > result["clip_score_mismatched"] + 30
    recorded = json.loads((TINY_CLIP / "build_info.json").read_text())["held_out"]
    assert recorded["top1_of_10"] >= 0.8 and recorded["n"] >= 1000


def test_tokenizer_knows_every_caption_word(scorer):
    tok = scorer.processor.tokenizer
    # The unknown token is <|endoftext|>, as in OpenAI's CLIP: it must not stand in for any caption text.
    for word in WORDS:
        tokens = tok.convert_ids_to_tokens(tok(word, add_special_tokens=False).input_ids)
        assert tok.unk_token not in tokens and "".join(tokens) == word + "</w>"
    assert tok.convert_ids_to_tokens(tok("a red circle").input_ids) == [
        "<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]
    rows = make_rows("t2i", 200, seed=4, split="val")
    for r in rows:
        tokens = tok.convert_ids_to_tokens(tok(r["prompt"]).input_ids)
        assert tokens[0] == "<|startoftext|>" and tokens[-1] == "<|endoftext|>" and tok.unk_token not in tokens[1:-1]
        assert "".join(tokens[1:-1]).replace("</w>", " ").replace(" ,", ",").strip() == r["prompt"]
        assert len(tokens) <= scorer.max_length


def test_batched_scores_equal_one_at_a_time(scorer):
    rows = make_rows("t2i", 5, seed=2, split="val")
    images, texts = list(shapes.images_of(rows)), [r["prompt"] for r in rows][::-1]
    batched = ClipScorer(batch_size=2)(images, texts)
    single = [scorer([im], [t])[0] for im, t in zip(images, texts)]
    assert np.allclose(batched, single, atol=1e-4)
    assert all(-100 <= s <= 100 for s in batched)
    assert np.allclose(scorer([torch.from_numpy(im) for im in images], texts), single, atol=1e-4)
    assert np.isfinite(scorer(images[:1], [" and ".join(texts) * 4])).all()  # truncated to 32 positions
    with pytest.raises(ValueError, match=r"image 1 is float32 \[32, 32, 3\]; expected uint8"):
        scorer([images[0], images[1].astype(np.float32)], texts[:2])
    with pytest.raises(ValueError, match=r"image 0 is uint8 \[3, 32, 32\]"):
        scorer([images[0].transpose(2, 0, 1)], texts[:1])


def test_clip_reward_nan_rule_errors_and_weighted_sum():
    rows = make_rows("t2i", 2) + make_rows("arithmetic", 1)
    images = [shapes.render(rows[0]["scene"]), shapes.render(rows[1]["scene"]), None]
    prompts = [r["prompt"] for r in rows]
    reward = build_reward("clip", {"scale": 0.1})
    scores = reward(prompts, ["", "", "x"], images=images)
    assert math.isnan(scores[2]) and all(0 < s <= 10 for s in scores[:2])
    with pytest.raises(ValueError, match="needs column 'images'"):
        reward(prompts, ["", "", "x"])
    total = WeightedReward([{"name": "clip", "weight": 0.1, "key": "clip_score", "tasks": ["t2i"]}])(
        prompts, ["", "", "x"], images=images, task=[r["task"] for r in rows])
    assert math.isnan(total["components"]["clip_score"][2]) and total["total"][2] == 0.0
    with pytest.raises(FileNotFoundError, match="CLIP directory '/nonexistent/clip' does not exist"):
        build_reward("clip", {"path": "/nonexistent/clip"})
    with pytest.raises(ValueError, match=r"images\[0\] against its prompt .* prompts\[0\] is NoneType"):
        reward([None, None, None], ["", "", "x"], images=images)


@pytest.mark.parametrize("remove, named", [
    (["config.json"], "config.json"),
    (["processor_config.json"], "preprocessor_config.json or processor_config.json"),
    (["tokenizer.json"], "tokenizer files"),
])
def test_missing_files_are_named(tmp_path, remove, named):
    clip = tmp_path / "clip"
    shutil.copytree(TINY_CLIP, clip)
    for name in remove:
        (clip / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"CLIP directory '{clip}' is missing: {named}"):
        ClipScorer(clip)


def test_reward_worker_decodes_codes_in_memory_and_scores_them():
    vq = load_image_tokenizer()
    rows = make_rows("t2i", 2, seed=3, split="val") + make_rows("arithmetic", 1)
    codes = vq.encode(shapes.images_of(rows[:2])).tolist()
    worker = RewardWorker([{"name": "clip", "weight": 0.1, "key": "clip_score", "tasks": ["t2i"]},
                           {"name": "math", "weight": 2.0, "tasks": ["arithmetic"]}], ["math"])
    try:
        out = worker.score([r["prompt"] for r in rows], ["", "", rows[2]["solution"]], rows, [codes[0], codes[1], None])
        swapped = worker.score([r["prompt"] for r in rows[:2]], ["", ""], rows[:2], [codes[1], codes[0]])
    finally:
        worker.close()
    clip = out.components["clip_score"]
    assert clip[0] > swapped.components["clip_score"][1]  # its own image beats the other caption's image
    assert math.isnan(out.accuracy[0]) and out.accuracy[2] == 1.0


def test_vit_l14_shaped_directory_scores_small_images(tmp_path):
    save_vit_l14_shaped_clip(tmp_path / "clip")
    scorer = ClipScorer(tmp_path / "clip", batch_size=2)
    assert scorer.model.config.vision_config.patch_size == 14 and scorer.model.config.projection_dim == 768
    rows = make_rows("t2i", 3)
    scores = scorer(list(shapes.images_of(rows)), [r["prompt"] for r in rows])
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores)
    (tmp_path / "clip" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"is missing: model weights"):
        ClipScorer(tmp_path / "clip")
