"""Unified tokens, the synthetic scenes, the image tokenizer, the MaskGIT image sampler and mixed-mode
rollouts (text, image-conditioned text, text-to-image in one batch)."""
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rl.data import shapes
from rl.data.encode import encode_prompts, encode_rows
from rl.data.loader import attach_image_codes
from rl.data.tasks import make_rows, validate_rows
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import (
    BOS,
    EOS,
    add_reserved_tokens,
    check_image_vocab,
    image_token_offset,
    multimodal_ids,
    train_tokenizer,
)
from rl.models.vq import VQConfig, VQImageTokenizer, load_image_tokenizer
from rollout.fast import FastSamplerConfig
from rollout.image import ImageSamplerConfig, generate_image, mask_schedule
from rollout.rollout import rollout
from rollout.sampler import SamplerConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vq():
    return load_image_tokenizer()


@pytest.fixture(scope="module")
def mm():
    """A random unified model and its tokenizer: MMaDA's layout scaled down (reserved tokens 0..10 after the
    trained vocabulary; image code c at len(tokenizer) + c, 128 codes, 64 per image; then 5 unused rows, as
    MMaDA-8B has 115)."""
    rows = make_rows("arithmetic", 50) + make_rows("shapes_qa", 50)
    tok = train_tokenizer([r["prompt"] for r in rows] + [r["solution"] for r in rows], vocab_size=300)
    add_reserved_tokens(tok)
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=len(tok) + 133,
                      codebook_size=128, num_vq_tokens=64, mask_token_id=tok.mask_token_id, rope_theta=10000.0,
                      max_sequence_length=512)
    return LLaDAModelLM(cfg).eval(), tok


# ---- scenes ---------------------------------------------------------------------------------------
def test_scene_caption_question_and_render_agree():
    rng = random.Random(3)
    for _ in range(50):
        scene = shapes.make_scene(rng)
        img = shapes.render(scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert all(f"{s['color']} {s['shape']}" in shapes.caption(scene) for s in scene["shapes"])
        assert shapes.caption(scene).endswith(f"on a {scene['background']} background")
        for s in scene["shapes"]:  # each shape's colour is at its centre
            assert tuple(img[int(s["y"]), int(s["x"])]) == shapes.COLORS[s["color"]]
        q, n = shapes.question(scene, rng)
        if q == "How many shapes?":
            assert n == len(scene["shapes"])
        elif q.endswith(" shapes?"):
            assert n == sum(s["color"] == q.split()[2] for s in scene["shapes"])
        else:
            assert n == sum(s["shape"] + "s" == q.split()[2][:-1] for s in scene["shapes"])


def test_task_rows_carry_mode_and_are_validated():
    t2i, qa = make_rows("t2i", 3), make_rows("shapes_qa", 3)
    assert {r["mode"] for r in t2i} == {"t2i"} and {r["mode"] for r in qa} == {"mmu"}
    assert qa[0]["solution"].endswith(f"<answer>{qa[0]['answer']}</answer>")
    with pytest.raises(ValueError, match=r"row 0 has mode 'video'"):
        validate_rows([{"prompt": "p", "answer": "a", "mode": "video"}], "f.jsonl")
    with pytest.raises(ValueError, match=r"row 0 \(mode 'mmu'\) needs an image"):
        validate_rows([{"prompt": "p", "answer": "a", "mode": "mmu"}], "f.jsonl")


# ---- image tokenizer --------------------------------------------------------------------------------
def test_shipped_vq_reconstructs_held_out_scenes(vq):
    imgs = shapes.images_of(make_rows("t2i", 64, seed=9, split="val"))
    codes = vq.encode(imgs)
    assert codes.shape == (64, vq.tokens_per_image) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < vq.codebook_size
    recon = vq.decode(codes)
    assert recon.dtype == torch.uint8 and recon.shape == imgs.shape
    assert (recon.float() - torch.from_numpy(imgs).float()).abs().mean() < 12  # of 255
    assert codes.unique().numel() > 32  # the codebook is in use, not collapsed


def test_vq_round_trip_files_and_errors(tmp_path):
    model = VQImageTokenizer(VQConfig(image_size=16, codebook_size=8, hidden=8, embed_dim=4))
    model.save_pretrained(tmp_path / "vq")
    again = load_image_tokenizer(tmp_path / "vq")
    imgs = np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    assert torch.equal(model.encode(imgs), again.encode(imgs))
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 16, 16, 3\]"):
        again.encode(imgs[:, :8])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        again.decode(torch.full((1, 16), 8))
    (tmp_path / "vq" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="is missing model.safetensors"):
        load_image_tokenizer(tmp_path / "vq")
    with pytest.raises(ValueError, match="downsample=3"):
        VQConfig(downsample=3)


def test_attach_image_codes_from_scene_file_and_bad_codes(vq, tmp_path):
    from PIL import Image
    row = make_rows("shapes_qa", 1)[0]
    Image.fromarray(shapes.render(row["scene"])).save(tmp_path / "scene.png")
    rows = [dict(row), {"prompt": "q", "answer": "1", "mode": "mmu", "image": str(tmp_path / "scene.png")}]
    attach_image_codes(rows, vq, "f.jsonl")
    assert rows[0]["image_codes"] == rows[1]["image_codes"] == vq.encode(shapes.render(row["scene"])[None])[0].tolist()
    with pytest.raises(ValueError, match=r"f.jsonl: row 0: cannot read image 'nope.png'"):
        attach_image_codes([{"prompt": "q", "answer": "1", "mode": "mmu", "image": "nope.png"}], vq, "f.jsonl")
    with pytest.raises(ValueError, match=r"f.jsonl: row 0 image_codes must be 64 integers in \[0, 128\)"):
        attach_image_codes([{"prompt": "q", "answer": "1", "mode": "mmu", "image_codes": [500] * 64}], vq, "f.jsonl")


# ---- unified tokens -----------------------------------------------------------------------------------
def test_config_and_load_check_the_image_rows(mm, tmp_path):
    with pytest.raises(ValueError, match="codebook_size"):
        LLaDAConfig(vocab_size=100, codebook_size=100, mask_token_id=3)
    model, tok = mm
    short = LLaDAConfig(**{**model.config.to_dict(), "vocab_size": len(tok) + 127, "embedding_size": len(tok) + 127})
    with pytest.raises(ValueError, match=rf"here: config.json vocab_size={len(tok) + 127} is too small .* "
                                         rf"len\(tokenizer\)={len(tok)} \+ codebook_size=128 = {len(tok) + 128} rows"):
        check_image_vocab(short, tok, "here")
    check_image_vocab(model.config, tok, "here")
    plain = train_tokenizer(["a b c"], vocab_size=270)
    with pytest.raises(ValueError, match=r"here: config.json codebook_size=128, but image rows need MMaDA's markers"):
        check_image_vocab(model.config, plain, "here")
    # at load: a checkpoint whose config has too few rows for its tokenizer + codebook
    from rl.models import load_checkpoint
    LLaDAModelLM(short).save_pretrained(tmp_path / "short")
    tok.save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match=r"checkpoint .*short.*: config.json vocab_size=.* too small"):
        load_checkpoint(tmp_path / "short")


def test_marker_ids_are_fixed_offsets_from_reserved_token_0(mm):
    _, tok = mm
    r0 = tok.convert_tokens_to_ids("<|reserved_token_0|>")
    assert r0 == 300 and len(tok) == 311  # the reserved block right after the trained vocabulary
    ids = multimodal_ids(tok)
    assert ids == {"<|soi|>": r0, "<|eoi|>": r0 + 1, "<|sov|>": r0 + 2, "<|eov|>": r0 + 3, "<|t2i|>": r0 + 4,
                   "<|mmu|>": r0 + 5, "<|t2v|>": r0 + 6, "<|v2v|>": r0 + 7, "<|lvg|>": r0 + 8, "[iPAD]": r0 + 9,
                   "<|r2i|>": r0 + 10}
    assert image_token_offset(tok) == 311
    assert tok.decode([r0 + 4, r0], skip_special_tokens=True) == ""  # special, as LLaDA's reserved tokens
    plain = train_tokenizer(["a b c"], vocab_size=270)
    with pytest.raises(ValueError, match=r"<\|reserved_token_0\|> \.\. <\|reserved_token_10\|> at consecutive ids .* "
                                         r"126084 \.\. 126094\), but it has none of them"):
        multimodal_ids(plain)
    plain.add_tokens([f"<|reserved_token_{i}|>" for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 9)], special_tokens=True)
    with pytest.raises(ValueError, match=r"but it has them at ids \[.*, 272, 274, 273\]"):
        multimodal_ids(plain)


def test_shipped_tiny_mmada_tokenizer_has_scene_words_and_keeps_text_tokens():
    from rl.models import TINY_CHECKPOINT, load_checkpoint, load_tokenizer
    model, mm_tok = load_checkpoint(TINY_CHECKPOINT.parent / "tiny-mmada")  # checks the code rows and markers
    text_tok = load_tokenizer(TINY_CHECKPOINT)
    # tiny-llada's tokenizer, LLaDA's reserved block 0..10 (MMaDA's markers), the scene words, then 128 codes
    n = len(text_tok)
    assert mm_tok.convert_ids_to_tokens(list(range(n, n + 11))) == [f"<|reserved_token_{i}|>" for i in range(11)]
    assert multimodal_ids(mm_tok)["<|soi|>"] == n and len(mm_tok) == n + 11 + len(shapes.WORDS)
    assert model.config.vocab_size == len(mm_tok) + 128 and model.config.codebook_size == 128
    for word in shapes.WORDS:
        assert len(mm_tok(word, add_special_tokens=False).input_ids) == 1, word
    for row in make_rows("arithmetic", 100, seed=1) + make_rows("countdown", 100, seed=1):
        for text in (row["prompt"], row["solution"]):
            assert (mm_tok(text, add_special_tokens=False).input_ids
                    == text_tok(text, add_special_tokens=False).input_ids)


def test_encode_rows_layouts(mm, vq):
    """MMaDA's sequences (prompting_utils.py t2i_gen_prompt / mmu_gen_prompt), token by token."""
    model, tok = mm
    offset = len(tok)
    text = make_rows("arithmetic", 3)
    assert all(torch.equal(a, b)
               for a, b in zip(encode_rows(tok, text), encode_prompts(tok, [r["prompt"] for r in text])))
    assert all(torch.equal(a, b)
               for a, b in zip(encode_rows(tok, text, offset), encode_prompts(tok, [r["prompt"] for r in text])))
    t2i, qa = make_rows("t2i", 1), make_rows("shapes_qa", 1)
    attach_image_codes(t2i + qa, vq, "rows")
    ids, mask = encode_rows(tok, text[:1] + t2i + qa, offset)
    rows = [ids[i][mask[i].bool()].tolist() for i in range(3)]
    assert rows[0] == encode_prompts(tok, [text[0]["prompt"]])[0][0].tolist()  # text: as before
    bos, eos = tok.convert_tokens_to_ids(BOS), tok.convert_tokens_to_ids(EOS)
    caption = tok(t2i[0]["prompt"], add_special_tokens=False).input_ids
    # t2i: <|t2i|> BOS caption EOS <|soi|>, then the image codes are the answer
    assert rows[1] == [304, bos] + caption + [eos, 300]
    assert tok.convert_ids_to_tokens(rows[1][:2] + rows[1][-2:]) == [
        "<|reserved_token_4|>", BOS, EOS, "<|reserved_token_0|>"]
    # mmu: <|mmu|> <|soi|> codes <|eoi|>, then the chat-formatted question (BOS first) and the assistant header
    codes = qa[0]["image_codes"]
    chat = tok.apply_chat_template([{"role": "user", "content": qa[0]["prompt"]}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat.startswith(BOS)
    assert rows[2] == [305, 300] + [311 + c for c in codes] + [301] + tok(chat, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(rows[2][:2] + rows[2][66:68]) == [
        "<|reserved_token_5|>", "<|reserved_token_0|>", "<|reserved_token_1|>", BOS]
    assert (ids[0][mask[0].bool()] < offset).all()
    with pytest.raises(ValueError, match="image rows need a model with image codes"):
        encode_rows(tok, qa)
    plain = train_tokenizer(["a b c"], vocab_size=270)
    with pytest.raises(ValueError, match=r"image rows need MMaDA's markers"):
        encode_rows(plain, qa, 300)


# ---- image sampler --------------------------------------------------------------------------------------
class TableModel(torch.nn.Module):
    """Fixed logits per answer position (what the model 'believes'), for checking the sampler's choices."""

    def __init__(self, table: torch.Tensor, vocab: int, prompt_len: int):
        super().__init__()
        self.table, self.vocab, self.P = table, vocab, prompt_len
        self.calls = []

    def forward(self, input_ids, attention_mask, logits_span=None):
        self.calls.append(input_ids.clone())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, self.P:] = self.table
        lo, hi = logits_span
        return SimpleNamespace(logits=logits[:, lo:hi])


def test_cosine_schedule_commits_the_most_confident_first():
    N, K, offset, steps = 16, 4, 10, 4
    table = torch.full((N, 10 + K), -10.0)
    conf = torch.linspace(5, 1, N)[torch.randperm(N, generator=torch.Generator().manual_seed(0))]
    table[torch.arange(N), offset + 2] = conf  # code 2 everywhere, with different certainty
    table[:, 3] = 100.0  # a text token the model "prefers": never sampled into an image
    model = TableModel(table, 10 + K, 3)
    cfg = ImageSamplerConfig(steps=steps, temperature=0.0, remask_temperature=0.0)
    out = generate_image(model, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), 0, N, offset, K,
                         cfg)
    assert (out.answer_ids == offset + 2).all()
    still_masked = [math.floor(N * mask_schedule(s, steps)) for s in range(steps - 1)] + [0]
    committed_by = [(out.commit_step[0] <= s).sum().item() for s in range(steps)]
    assert committed_by == [N - m for m in still_masked]
    order = out.commit_step[0]
    assert all(conf[i] > conf[j] for i in range(N) for j in range(N) if order[i] < order[j])
    assert out.forward_passes == steps == len(model.calls)


def test_image_sampler_gumbel_noise_and_cfg(mm):
    model, tok = mm
    cfg = model.config
    ids, mask = encode_rows(tok, make_rows("t2i", 2), len(tok))
    def run(c, seed):
        return generate_image(model, ids, mask, tok.mask_token_id, 64, len(tok),
                              cfg.codebook_size, c, torch.Generator().manual_seed(seed))

    a, b = run(ImageSamplerConfig(steps=6), 0), run(ImageSamplerConfig(steps=6), 0)
    assert torch.equal(a.answer_ids, b.answer_ids)  # seeded
    assert not torch.equal(a.answer_ids, run(ImageSamplerConfig(steps=6), 1).answer_ids)
    assert ((a.answer_ids >= len(tok)) & (a.answer_ids < len(tok) + cfg.codebook_size)).all()
    assert (a.commit_step >= 0).all() and a.commit_step.max() == 5
    guided = run(ImageSamplerConfig(steps=6, temperature=0, cfg_scale=3.0), 0)
    plain = run(ImageSamplerConfig(steps=6, temperature=0), 0)
    assert not torch.equal(guided.answer_ids, plain.answer_ids)
    assert guided.row_tokens == 2 * plain.row_tokens  # the unconditional rows ride along
    with pytest.raises(ValueError, match=r"rollout.image.steps=0"):
        ImageSamplerConfig(steps=0)


def test_mixed_rollout_keeps_order_lengths_and_masks(mm, vq):
    model, tok = mm
    rows = make_rows("arithmetic", 2) + make_rows("t2i", 2) + make_rows("shapes_qa", 1)
    random.Random(0).shuffle(rows)
    attach_image_codes(rows, vq, "rows")
    sampler = FastSamplerConfig(gen_length=32, block_length=16, steps=32, temperature=0.9)
    batch = rollout(model, tok, rows, 2, sampler, torch.Generator().manual_seed(0),
                    image_sampler=ImageSamplerConfig(steps=4))
    offset = len(tok)
    assert batch.answer_ids.shape == (10, 64) and [r["prompt"] for r in batch.rows][::2] == [r["prompt"] for r in rows]
    for i, row in enumerate(batch.rows):
        codes = batch.images[i]
        if row.get("mode") == "t2i":
            assert batch.completions[i] == "" and len(codes) == 64
            assert batch.answer_mask[i].sum() == 64 and torch.equal(batch.answer_ids[i] - offset, torch.tensor(codes))
        else:
            assert codes is None and (batch.answer_mask[i, 32:] == 0).all()
            assert (batch.answer_ids[i, :32] < offset).all()  # a text answer never draws an image code
    assert batch.commit_step.shape == (10, 64) and batch.tokens_per_step.shape == (10,)


def test_text_answers_of_a_unified_model_draw_text_tokens_only(mm, vq):
    # A random model puts ~30% of its mass on the 128 image codes; both text samplers must exclude them.
    model, tok = mm
    rows = attach_image_codes(make_rows("arithmetic", 2) + make_rows("shapes_qa", 2), vq, "rows")
    offset = len(tok)
    for sampler in (SamplerConfig(gen_length=32, block_length=16, steps=32, temperature=1.0),
                    FastSamplerConfig(gen_length=32, block_length=16, steps=32, temperature=1.0, threshold=None,
                                      early_stop=False)):
        batch = rollout(model, tok, rows, 4, sampler, torch.Generator().manual_seed(1))
        assert (batch.answer_ids < offset).all() and (batch.answer_ids != tok.mask_token_id).all()


def test_batch_metrics_measure_text_lengths_when_image_answers_are_longer():
    from rewards.worker import Scores
    from rl.batch import RolloutBatch
    from rl.metrics import batch_metrics

    # gen_length 4, image answers 8 codes: a text answer is clipped when position 3 is still counted.
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0],   # text, no end token: clipped
                         [1, 1, 0, 0, 0, 0, 0, 0],   # text, ended at position 1
                         [1, 1, 1, 1, 1, 1, 1, 1]],  # image codes
                        dtype=torch.float)
    batch = RolloutBatch(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
                         torch.zeros(3, 8, dtype=torch.long), mask, rewards=torch.tensor([0.0, 1.0, 0.5]),
                         images=[None, None, list(range(8))], tokens_per_step=torch.ones(3), seconds=1.0,
                         rows=[{"task": "arithmetic"}, {"task": "shapes_qa"}, {"task": "t2i"}])
    scores = Scores([0.0] * 3, [0.0, 1.0, float("nan")], {"clip_score": [float("nan")] * 2 + [40.0]})
    m = batch_metrics(batch, scores, 4, 2.0)
    assert m["response_length/clip_ratio"] == 0.5
    assert m["response_length/mean"] == 3.0 and m["response_length/max"] == 4.0
    assert m["train/accuracy"] == 0.5 and m["reward/clip_score/mean"] == 40.0
    assert (m["train/arithmetic/accuracy"], m["train/shapes_qa/accuracy"]) == (0.0, 1.0)
    assert "train/t2i/accuracy" not in m
