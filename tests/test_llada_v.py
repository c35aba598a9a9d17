"""LLaDA-V (rl/models/llada_v.py): GSAI-ML/LLaDA-V's checkpoint layout, image placeholders, the frozen tower."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from rl.models import check_model_files, load_checkpoint, load_model
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.llada_v import IMAGE_NEWLINE_ID, LORA_TARGETS, LLaDAVConfig, LLaDAVModelLM
from rl.models.tokenizer import train_tokenizer

torch.set_num_threads(1)

# GSAI-ML/LLaDA-V's config.json as published (see /tmp/llada_v_facts.md for the sources): LLaVA's mm_* keys,
# the LLaMA-style LM keys of LLaDA-V's configuration_llada.py, no vision_config, anyres_max_4.
PUBLISHED = {
    "architectures": ["LlavaLLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                 "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
    "model_type": "llava_llada",
    "add_faster_video": False, "add_time_instruction": False, "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 126081, "faster_token_stride": 10, "force_sample": False,
    "hidden_act": "silu", "hidden_size": 4096, "image_aspect_ratio": "anyres_max_4", "image_crop_resolution": None,
    "image_grid_pinpoints": [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)],
    "image_split_resolution": None, "initializer_range": 0.02, "intermediate_size": 12288,
    "max_position_embeddings": 16384, "mm_hidden_size": 1152, "mm_newline_position": "grid",
    "mm_patch_merge_type": "spatial_unpad", "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_resampler_type": None, "mm_spatial_pool_mode": "bilinear", "mm_spatial_pool_stride": None,
    "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
    "mm_vision_tower": "google/siglip2-so400m-patch14-384", "mm_vision_tower_lr": 2e-06,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pos_skipping_range": 4096,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "tokenizer_model_max_length": 8192, "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": False, "use_mm_proj": True,
    "use_pos_skipping": False, "vision_tower_pretrained": None, "vocab_size": 126464,
}
# A 2-layer SigLIP: 32 px images of 8 px patches = 16 tokens per image.
TINY_TOWER = dict(model_type="siglip_vision_model", hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh",
                  layer_norm_eps=1e-6)
TINY = {**PUBLISHED, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rope_theta": 10000.0, "mm_hidden_size": 24, "vision_config": TINY_TOWER,
        "mm_vision_tower": "test/tiny-siglip"}
N = 16  # tokens per tiny image

# Exact tensor names of GSAI-ML/LLaDA-V's safetensors (LLaDA-V's rename_checkpoint.py, projector builder,
# SigLipVisionTower), here for a 2-layer LM and a tower of 2 - 1 layers.
PUBLISHED_NAMES = [
    "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
    "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight",
    "model.layers.1.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight",
    "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
    "model.mm_projector.2.bias", "model.image_newline",
    "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
    "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias",
    "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
]


def tiny_config(**kw):
    return LLaDAVConfig(**{**TINY, "vocab_size": 64, "mask_token_id": 3, "image_aspect_ratio": "pad", **kw})


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = LLaDAVModelLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # no zero biases / unit norms hiding a swapped tensor
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def pixels(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)


def prompt(model, image, text=(5, 6, 7), answer=(8, 9, 3, 3)):
    return [*text, *model.image_placeholder_ids(image), 10, *answer]


@pytest.fixture(scope="module")
def published_dir(tmp_path_factory):
    return write_published(tmp_path_factory.mktemp("llada-v"))


def write_published(path):
    """A tiny random LLaDA-V written as GSAI-ML/LLaDA-V is: its config.json keys (anyres_max_4 included) and
    tensor names, plus a tokenizer; returns (path, the model it was written from)."""
    tok = train_tokenizer(["Ann has 12 apples and gets 3 more.", "What is in the picture?"] * 3, vocab_size=270)
    model = tiny_model(vocab_size=len(tok), mask_token_id=tok.mask_token_id)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    # + mask_token_id: the published file has none (LLaDA-V hard-codes 126336, this config's default)
    config = {**TINY, "vocab_size": len(tok), "mask_token_id": tok.mask_token_id}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(path)
    return path, model


def test_published_layout_names(published_dir):
    path, model = published_dir
    names = set(load_file(str(path / "model.safetensors")))
    assert set(model.state_dict()) == names
    for name in PUBLISHED_NAMES:
        assert name in names
    # LLaDA-V deletes the tower's last encoder layer and its pooling head
    tower = [n for n in names if "vision_tower" in n]
    assert not any(".encoder.layers.1." in n or ".head." in n for n in tower)
    assert not any(n.startswith("model.transformer.") for n in names)


def test_published_config_is_refused_until_the_aspect_ratio_is_overridden(published_dir):
    path, model = published_dir
    for call in (lambda: load_model(path), lambda: check_model_files(path)):
        with pytest.raises(ValueError, match="image_aspect_ratio='anyres_max_4'.*'pad'") as e:
            call()
        assert "config.json" in str(e.value)
    assert check_model_files(path, image_aspect_ratio="pad") == path
    assert LLaDAVConfig.from_pretrained(path, image_aspect_ratio="square").image_aspect_ratio == "square"
    assert load_model(path, image_aspect_ratio="pad").dtype == torch.bfloat16  # config.json's torch_dtype
    loaded, tok = load_checkpoint(path, dtype=torch.float32, image_aspect_ratio="pad")
    assert type(loaded) is LLaDAVModelLM and loaded.config.mask_token_id == tok.mask_token_id
    ids = torch.tensor([prompt(model, 0), prompt(model, 1)])
    want = model(ids, image_features=model.encode_images(pixels(2))).logits
    got = loaded(ids, image_features=loaded.encode_images(pixels(2))).logits
    assert torch.equal(got, want)


def test_save_load_round_trip_is_bit_identical(published_dir, tmp_path):
    path, _ = published_dir
    model = load_model(path, image_aspect_ratio="pad")
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((path / "tokenizer.json").read_bytes())
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(load_file(str(path / "model.safetensors")))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "llava_llada" and saved["vision_config"]["num_hidden_layers"] == 2
    again = load_model(tmp_path)  # the saved config says "pad" and embeds the tower's config
    ids = torch.tensor([prompt(model, 0, answer=(3, 3, 3, 3)), [5, 6, 7, 8, 9, 10] + [3] * (N + 3)])
    feats = model.encode_images(pixels(1, seed=4))
    assert torch.equal(again.encode_images(pixels(1, seed=4)), feats)
    assert torch.equal(again(ids, image_features=feats).logits, model(ids, image_features=feats).logits)


def test_llada_model_type_with_llava_keys_loads_as_llada_v(published_dir, tmp_path):
    # checkpoints fine-tuned from LLaDA-V through LLaDA's remote code save model_type "llada"
    path, model = published_dir
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llada"}))
    assert type(load_model(tmp_path, image_aspect_ratio="pad")) is LLaDAVModelLM


def test_language_model_is_llada_under_llada_v_names():
    """The LM is LLaDA-8B's: LLaDAModelLM weights renamed as LLaDA-V's rename_checkpoint.py does give the
    same logits for text (a swapped gate/up or q/k pairing would not)."""
    v = tiny_model()
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=64,
                      mask_token_id=3, rope_theta=10000.0)
    llada = LLaDAModelLM(cfg).eval()
    rename = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
              "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
              "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}
    vs = v.state_dict()
    state = {"model.transformer.wte.weight": vs["model.embed_tokens.weight"],
             "model.transformer.ln_f.weight": vs["model.norm.weight"],
             "model.transformer.ff_out.weight": vs["lm_head.weight"]}
    for i in range(2):
        for old, new in rename.items():
            state[f"model.transformer.blocks.{i}.{old}.weight"] = vs[f"model.layers.{i}.{new}.weight"]
    llada.load_state_dict(state)
    x = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    torch.testing.assert_close(v(x, attention_mask=mask).logits, llada(input_ids=x, attention_mask=mask).logits,
                               atol=0, rtol=0)


def test_placeholders_are_projected_features_in_place_of_tokens():
    model = tiny_model()
    feats = model.encode_images(pixels(2))
    assert feats.shape == (2, N, 24) and model.tokens_per_image == N == model.config.tokens_per_image
    ids = torch.tensor([prompt(model, 1), prompt(model, 0)])  # row 0 shows image 1
    # by hand: word embeddings, projector(features) rows at the placeholders, image_newline after each image
    m = model.model
    embeds = m.embed_tokens(ids.clamp_min(0)).detach().clone()
    projected = m.mm_projector(feats.reshape(-1, 24))
    for b, image in ((0, 1), (1, 0)):
        embeds[b, 3:3 + N] = projected[image * N:(image + 1) * N]
        embeds[b, 3 + N] = m.image_newline
    assert ids[0, 3 + N] == IMAGE_NEWLINE_ID and model.positions_per_image == N + 1
    want = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(model(ids, image_features=feats).logits, want, atol=0, rtol=0)
    # another image changes the answer's logits; text-only input ignores image_features (CFG's blank pass)
    other = model(ids, image_features=model.encode_images(pixels(2, seed=7))).logits
    assert not torch.allclose(other[:, -4:], want[:, -4:])
    text = torch.tensor([[5, 6, 7, 10, 8, 9]])
    assert torch.equal(model(text, image_features=feats).logits, model(text).logits)


def test_features_are_the_full_towers_second_to_last_hidden_state():
    model = tiny_model()
    full_config = AutoConfig.for_model(**TINY_TOWER)  # the whole 2-layer tower, pooling head included
    full = AutoModel.from_config(full_config).eval()
    missing, unexpected = full.load_state_dict(model.vision_model.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(("encoder.layers.1.", "head.")) for k in missing)
    px = pixels(3)
    normalised = (px.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5  # SigLIP: rescale 1/255, mean 0.5, std 0.5
    with torch.no_grad():
        want = full(pixel_values=normalised, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(model.encode_images(px), want, atol=1e-6, rtol=1e-6)
    seen = []
    model.vision_model.embeddings.patch_embedding.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    black_white = torch.zeros(1, 32, 32, 3, dtype=torch.uint8)
    black_white[:, :, 16:] = 255
    model.encode_images(black_white)
    assert seen[0].min() == -1.0 and seen[0].max() == 1.0


def test_kv_cache_window_over_the_answer_matches_the_full_call():
    model = tiny_model()
    feats = model.encode_images(pixels(2))
    ids = torch.tensor([prompt(model, 0, answer=(8, 3, 3, 3)), prompt(model, 1, answer=(9, 9, 3, 3))])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row
    full = model(ids, attention_mask=mask, image_features=feats, return_kv=True)
    lo, hi = ids.shape[1] - 4, ids.shape[1]
    # the window holds answer tokens only: no placeholders, so no features are needed
    window = model(ids[:, lo:hi], attention_mask=mask, kv_cache=full.kv, cache_span=(lo, hi))
    torch.testing.assert_close(window.logits, full.logits[:, lo:hi], atol=1e-5, rtol=1e-5)
    part = model(ids, attention_mask=mask, image_features=feats, logits_span=(lo, hi)).logits
    torch.testing.assert_close(part, full.logits[:, lo:hi], atol=1e-5, rtol=1e-5)


def test_gradient_reaches_projector_newline_and_lm_but_not_the_frozen_tower():
    model = tiny_model().train()
    feats = model.encode_images(pixels(2))
    assert not feats.requires_grad
    ids = torch.tensor([prompt(model, 0), prompt(model, 1)])
    model(ids, image_features=feats).logits[:, -4:].float().pow(2).mean().backward()
    m = model.model
    for p in (m.mm_projector[0].weight, m.mm_projector[2].bias, m.image_newline, m.layers[0].self_attn.q_proj.weight,
              m.embed_tokens.weight, model.lm_head.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.vision_model.parameters())
    model.freeze_vision_tower(False)
    assert model.encode_images(pixels(1)).requires_grad


def test_errors_name_what_is_wrong():
    model = tiny_model()
    ids = torch.tensor([prompt(model, 0)])
    with pytest.raises(ValueError, match="image placeholders .* image_features is None"):
        model(ids)
    out_of_range = rf"id -{2 * N} refers to feature row {2 * N - 1}, but image_features hold {N} rows"
    with pytest.raises(ValueError, match=out_of_range):
        model(torch.tensor([prompt(model, 1)]), image_features=model.encode_images(pixels(1)))
    with pytest.raises(ValueError, match="mm_hidden_size=24"):
        model(ids, image_features=torch.zeros(1, N, 7))
    for bad in (pixels(1).float(), pixels(1)[:, :16], pixels(1).permute(0, 3, 1, 2), pixels(1)[0]):
        with pytest.raises(ValueError, match=r"uint8 tensor \[n, 32, 32, 3\].*image_size=32"):
            model.encode_images(bad)
    flat = tiny_model(mm_patch_merge_type="flat")
    assert not hasattr(flat.model, "image_newline") and flat.image_placeholder_ids(0)[-1] == -N
    with pytest.raises(ValueError, match="no image_newline"):
        flat(ids, image_features=flat.encode_images(pixels(1)))
    with pytest.raises(ValueError, match="image_aspect_ratio='anyres'.*'square', 'pad' or null"):
        tiny_config(image_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="mm_vision_tower='someone/tower'.*vision_config"):
        LLaDAVConfig(**{**PUBLISHED, "image_aspect_ratio": "pad", "mm_vision_tower": "someone/tower"})
    with pytest.raises(ValueError, match="mm_hidden_size=1152: must equal the vision tower's hidden_size=24"):
        tiny_config(mm_hidden_size=1152)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        tiny_config(hidden_act="gelu")
    with pytest.raises(ValueError, match="rope_scaling="):
        tiny_config(rope_scaling={"type": "linear", "factor": 2.0})


def test_not_a_unified_token_model():
    config = tiny_config()
    assert config.codebook_size == 0 and config.num_vq_tokens == 0
    assert (config.d_model, config.n_heads, config.n_kv_heads, config.n_layers, config.mlp_hidden_size) == (
        32, 4, 2, 2, 48)
    assert config.mask_token_id == 3 and config.eos_token_id == 126081 and not config.weight_tying


def test_real_llada_v_8b_builds_on_meta():
    with pytest.raises(ValueError, match="image_aspect_ratio"):
        LLaDAVConfig(**PUBLISHED)
    config = LLaDAVConfig(**{**PUBLISHED, "image_aspect_ratio": "pad"})  # the tower's architecture is built in
    assert (config.image_size, config.patch_size, config.tokens_per_image) == (384, 14, 729)
    assert config.vision_config.num_hidden_layers == 27 and config.tower_layers == 26
    assert config.mask_token_id == 126336 and config.vocab_size == 126464
    with torch.device("meta"):
        model = LLaDAVModelLM(config)
    params = dict(model.named_parameters())
    assert all(p.is_meta for p in params.values())
    assert model.tokens_per_image == 729 and model.positions_per_image == 730
    n = sum(p.numel() for p in params.values())
    tower = sum(p.numel() for p in model.vision_model.parameters())
    assert 8.3e9 < n < 8.6e9 and 3.8e8 < tower < 4.1e8  # LLaDA-8B's 8.02B + SigLIP so400m less a layer
    assert params["model.mm_projector.0.weight"].shape == (4096, 1152)
    assert params["model.mm_projector.2.weight"].shape == (4096, 4096)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.25.mlp.fc2.weight" in params
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.26.mlp.fc2.weight" not in params


def test_lora_targets_are_the_language_models_projections_only():
    model = tiny_model()
    hit = [n for n, mod in model.named_modules() if re.fullmatch(LORA_TARGETS, n)]
    assert len(hit) == 2 * 7 and all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in hit)
    assert "model.layers.1.mlp.down_proj" in hit and not any("vision" in n or "projector" in n for n in hit)
