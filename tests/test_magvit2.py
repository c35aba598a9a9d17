"""MAGVIT-v2 tokenizer (rl/models/magvit2.py): the published showlab/magvitv2 layout, the LFQ bit convention,
the image-tokenizer interface, and clear errors for bad files. A scaled-down random model stands in for the
published weights (which this machine cannot download); the real size is checked on the meta device."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rl.models.magvit2 import (
    DERIVED_BUFFERS,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    LFQuantizer,
    MAGVITv2Config,
    MAGVITv2Tokenizer,
)
from rl.models.vq import VQConfig, VQImageTokenizer, load_image_tokenizer

# 3 levels (4x down): 32 px -> 8x8 = 64 codes of 2**6. Block counts differ per level and side, as published.
SMALL = dict(ch=32, encoder_ch_mult=(1, 2, 2), encoder_num_res_blocks=(2, 1, 1), decoder_ch_mult=(1, 1, 2),
             decoder_num_res_blocks=(1, 2, 1), z_channels=6, image_size=32)


def published_names(ch, enc_mult, enc_blocks, dec_mult, dec_blocks) -> set[str]:
    """State-dict names of Show-o's MAGVITv2 (models/modeling_magvitv2.py + common_modules.py), enumerated here
    from that layout independently of rl/models/magvit2.py."""
    names = []

    def conv(p):
        names.extend([f"{p}.weight", f"{p}.bias"])

    def resnet(p, cin, cout):
        for part in ("norm1", "conv1", "norm2", "conv2") + (("nin_shortcut",) if cin != cout else ()):
            conv(f"{p}.{part}")

    def mid(p, c):
        resnet(f"{p}.block_1", c, c)
        for part in ("norm", "q", "k", "v", "proj_out"):
            conv(f"{p}.attn_1.{part}")
        resnet(f"{p}.block_2", c, c)

    conv("encoder.conv_in")
    cin = ch
    for lvl, (m, n) in enumerate(zip(enc_mult, enc_blocks)):
        for b in range(n):
            resnet(f"encoder.down.{lvl}.block.{b}", cin, ch * m)
            cin = ch * m
        if lvl != len(enc_mult) - 1:
            conv(f"encoder.down.{lvl}.downsample.conv")
    mid("encoder.mid", cin)
    for p in ("norm_out", "conv_out", "quant_conv"):
        conv(f"encoder.{p}")
    conv("decoder.post_quant_conv")
    conv("decoder.conv_in")
    cin = ch * dec_mult[-1]
    mid("decoder.mid", cin)
    for lvl in reversed(range(len(dec_mult))):
        for b in range(dec_blocks[lvl]):
            resnet(f"decoder.up.{lvl}.block.{b}", cin, ch * dec_mult[lvl])
            cin = ch * dec_mult[lvl]
        if lvl != 0:
            conv(f"decoder.up.{lvl}.upsample.conv")
    conv("decoder.norm_out")
    conv("decoder.conv_out")
    return set(names) | {"quantize.embedding", "quantize.power_vals"}


def small_names():
    return published_names(SMALL["ch"], SMALL["encoder_ch_mult"], SMALL["encoder_num_res_blocks"],
                           SMALL["decoder_ch_mult"], SMALL["decoder_num_res_blocks"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random scaled-down MAGVIT-v2 saved in the published layout: (model, its directory)."""
    torch.manual_seed(0)
    model = MAGVITv2Tokenizer(MAGVITv2Config(**SMALL)).eval()
    path = tmp_path_factory.mktemp("magvit2") / "small"
    model.save_pretrained(path)
    return model, path


def images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def copy_dir(src, dst, state=None, config=None):
    """A copy of a saved tokenizer, optionally with another state dict or config.json."""
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(config) if config is not None else (src / "config.json").read_text())
    save_file(state if state is not None else load_file(src / WEIGHTS_NAME), dst / WEIGHTS_NAME)
    return dst


def test_saved_in_the_published_layout(small):
    _, path = small
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "pytorch_model.safetensors"]
    raw = json.loads((path / "config.json").read_text())
    assert raw["_class_name"] == "MAGVITv2" and raw["_diffusers_version"] == "0.30.1"
    state = load_file(path / WEIGHTS_NAME)
    assert set(state) == small_names()
    for name in ("encoder.conv_in.weight", "encoder.down.0.block.1.conv2.weight", "encoder.down.0.downsample.conv.bias",
                 "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.proj_out.weight",
                 "encoder.quant_conv.weight", "quantize.embedding", "quantize.power_vals",
                 "decoder.post_quant_conv.weight", "decoder.up.1.block.1.conv1.weight",
                 "decoder.up.2.upsample.conv.weight", "decoder.conv_out.weight"):
        assert name in state, name
    # No time embedding, no per-level attention (attn_resolutions=[5] never matches), no resampling at the ends.
    assert not any("temb" in k or ".attn." in k for k in state)
    assert "encoder.down.2.downsample.conv.weight" not in state and "decoder.up.0.upsample.conv.weight" not in state
    assert state["encoder.conv_out.weight"].shape == (6, 64, 3, 3)
    assert state["decoder.conv_in.weight"].shape == (64, 6, 3, 3)
    assert state["quantize.embedding"].shape == (64, 6) and state["quantize.power_vals"].dtype == torch.long


def test_real_size_matches_the_published_model_without_allocating(tmp_path):
    config = MAGVITv2Config()  # the published sizes are the defaults
    assert config.to_json() == {"_class_name": "MAGVITv2", "_diffusers_version": "0.30.1"}  # the 66-byte file
    assert len(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n") == 66
    with torch.device("meta"):
        model = MAGVITv2Tokenizer(config)
    assert (model.codebook_size, model.grid, model.tokens_per_image) == (8192, 32, 1024)
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert set(state) == published_names(128, (1, 2, 2, 4, 4), (4, 3, 4, 3, 4), (1, 1, 2, 2, 4), (4, 4, 3, 4, 3))
    assert len(state) == 382
    shapes = {"encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (13, 512, 3, 3),
              "encoder.down.3.block.0.nin_shortcut.weight": (512, 256, 1, 1),
              "encoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.conv_in.weight": (512, 13, 3, 3),
              "decoder.up.1.block.0.conv1.weight": (128, 256, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
              "quantize.embedding": (8192, 13), "quantize.power_vals": (13,)}
    for name, shape in shapes.items():
        assert tuple(state[name].shape) == shape, name
    # 95.4M float32 parameters: 381.5 MB, the size of the published pytorch_model.safetensors (382 MB).
    assert sum(p.numel() for p in model.parameters()) == 95_387_004
    # The published two-key config.json alone: the loader wants the weights before it builds anything.
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "MAGViTv2", "_diffusers_version": "0.30.1"}))
    with pytest.raises(FileNotFoundError, match="is missing pytorch_model.safetensors"):
        load_image_tokenizer(tmp_path)


def test_loads_through_load_image_tokenizer(small):
    model, path = small
    again = load_image_tokenizer(path)
    assert isinstance(again, MAGVITv2Tokenizer) and not again.training
    assert again.config == model.config
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    imgs = images()
    assert torch.equal(again.encode(imgs), model.encode(imgs))


def test_encode_decode_shapes_dtypes_and_code_range(small):
    model, _ = small
    assert (model.codebook_size, model.grid, model.tokens_per_image, model.config.image_size) == (64, 8, 64, 32)
    imgs = images(3)
    codes = model.encode(imgs)
    assert codes.dtype == torch.long and codes.shape == (3, 64) and codes.device.type == "cpu"
    assert 0 <= codes.min() and codes.max() < 64
    assert codes.unique().numel() > 4  # the random model still spreads over the codebook
    assert torch.equal(model.encode(torch.from_numpy(imgs)), codes)  # numpy or torch in
    # Codes are the sign bits of the encoder output, channel 0 first (row-major grid).
    with torch.no_grad():
        z = model.encoder(model.to_input(imgs))
    bits = (z > 0).long().permute(0, 2, 3, 1).reshape(3, 64, 6)
    assert torch.equal(codes, (bits * torch.tensor([32, 16, 8, 4, 2, 1])).sum(-1))
    out = model.decode(codes)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32, 3) and out.device.type == "cpu"
    with torch.no_grad():
        expected = model.to_pixels(model.decoder(model.quantize.latents(codes, 8)))
    assert torch.equal(out, expected)
    # A bfloat16 model takes the same uint8 in and gives codes and uint8 out.
    half = MAGVITv2Tokenizer(model.config).eval()
    half.load_state_dict(model.state_dict())
    half.to(torch.bfloat16)
    assert half.encode(imgs).dtype == torch.long and half.decode(codes).dtype == torch.uint8


def test_pixel_conventions():
    model = MAGVITv2Tokenizer(MAGVITv2Config(**SMALL))
    x = model.to_input(np.array([0, 255, 128], dtype=np.uint8).reshape(1, 1, 1, 3).repeat(32, 1).repeat(32, 2))
    # MMaDA's image_transform: ToTensor (v / 255) then Normalize(mean=0.5, std=0.5).
    assert torch.allclose(x[0, :, 0, 0], (torch.tensor([0.0, 255.0, 128.0]) / 255 - 0.5) / 0.5, atol=1e-6)
    # MMaDA: clamp((x + 1) / 2, 0, 1) * 255, truncated.
    out = MAGVITv2Tokenizer.to_pixels(torch.tensor([-3.0, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6))
    assert out.flatten().tolist() == [0, 0, 127, 254, 255, 255]


@pytest.mark.parametrize("bits", [6, 13])
def test_lfq_bit_convention_round_trips_every_code(bits):
    q = LFQuantizer(bits)
    codes = torch.arange(2**bits).view(-1, 64)  # every code once, in images of 8x8 codes
    z = q.latents(codes, 8)
    assert z.shape == (codes.shape[0], bits, 8, 8) and set(z.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(q.codes(z), codes)
    # Channel 0 is the most significant bit; bit 1 is +1, bit 0 is -1; a latent of exactly 0 is bit 0.
    table = q.embedding
    assert table[0].tolist() == [-1.0] * bits and table[-1].tolist() == [1.0] * bits
    assert table[1].tolist() == [-1.0] * (bits - 1) + [1.0]
    assert table[2 ** (bits - 1)].tolist() == [1.0] + [-1.0] * (bits - 1)
    assert q.power_vals.tolist() == [2**i for i in reversed(range(bits))]
    assert q.codes(torch.zeros(1, bits, 1, 1)).item() == 0
    assert q.codes(torch.full((1, bits, 1, 1), 1e-6)).item() == 2**bits - 1


def test_input_checks(small):
    model, _ = small
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 32, 32, 3\]"):
        model.encode(images(size=16))
    with pytest.raises(ValueError, match=r"expected uint8 images \[B, 32, 32, 3\], got torch.float32"):
        model.encode(torch.zeros(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"expected codes \[B, 64\], got \(1, 63\)"):
        model.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 64\), got \[0, 64\]"):
        model.decode(torch.tensor([[0] * 63 + [64]]))
    with pytest.raises(ValueError, match="codes must lie"):
        model.decode(torch.full((1, 64), -1))
    with pytest.raises(ValueError, match="multiples of 32"):
        MAGVITv2Config(ch=16)
    with pytest.raises(ValueError, match="image_size=34"):
        MAGVITv2Config(**{**SMALL, "image_size": 34})


def test_weight_file_variants(small, tmp_path):
    model, path = small
    state = load_file(path / WEIGHTS_NAME)
    imgs = images()
    # Without the LFQ tables (they follow from the bit convention) it still loads, strictly.
    lean = copy_dir(path, tmp_path / "lean", {k: v for k, v in state.items() if k not in DERIVED_BUFFERS})
    assert torch.equal(load_image_tokenizer(lean).encode(imgs), model.encode(imgs))
    # The pickled pytorch_model.bin the repo first shipped, read with weights_only=True.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save(state, legacy / LEGACY_WEIGHTS_NAME)
    assert torch.equal(load_image_tokenizer(legacy).encode(imgs), model.encode(imgs))


def test_damaged_and_mismatched_files_give_clear_errors(small, tmp_path):
    _, path = small
    state = load_file(path / WEIGHTS_NAME)
    missing = copy_dir(path, tmp_path / "missing", {k: v for k, v in state.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(ValueError, match=r"pytorch_model.safetensors: .*1 missing keys \[decoder.conv_out.bias\]"):
        load_image_tokenizer(missing)
    extra = copy_dir(path, tmp_path / "extra", {**state, "encoder.down.0.attn.0.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1 unexpected keys \[encoder.down.0.attn.0.q.weight\]"):
        load_image_tokenizer(extra)
    shape = copy_dir(path, tmp_path / "shape", {**state, "encoder.conv_in.weight": torch.zeros(32, 3, 1, 1)})
    with pytest.raises(ValueError, match=r"encoder.conv_in.weight: file \(32, 3, 1, 1\) vs model \(32, 3, 3, 3\)"):
        load_image_tokenizer(shape)
    lsb_first = {**state, "quantize.embedding": state["quantize.embedding"].flip(1)}
    with pytest.raises(ValueError, match="quantize.embedding differs from the LFQ convention"):
        load_image_tokenizer(copy_dir(path, tmp_path / "lsb", lsb_first))
    damaged = copy_dir(path, tmp_path / "damaged")
    data = (damaged / WEIGHTS_NAME).read_bytes()
    (damaged / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"damaged/pytorch_model.safetensors: cannot read the weights"):
        load_image_tokenizer(damaged)
    gone = copy_dir(path, tmp_path / "gone")
    (gone / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="is missing pytorch_model.safetensors \\(or pytorch_model.bin\\)"):
        load_image_tokenizer(gone)


def test_config_dispatch_and_config_errors(small, tmp_path):
    _, path = small
    vq = tmp_path / "vq"
    VQImageTokenizer(VQConfig(image_size=16, codebook_size=8, hidden=8, embed_dim=4)).save_pretrained(vq)
    assert isinstance(load_image_tokenizer(vq), VQImageTokenizer)
    assert isinstance(load_image_tokenizer(), VQImageTokenizer)  # the shipped tiny VQ
    other = copy_dir(path, tmp_path / "other", config={"_class_name": "AutoencoderKL"})
    with pytest.raises(ValueError, match=r"other/config.json: not an image tokenizer config: expected type='vq' "
                                         r"\(this project's VQ\) or _class_name='MAGVITv2'"):
        load_image_tokenizer(other)
    unknown = copy_dir(path, tmp_path / "unknown", config={"_class_name": "MAGVITv2", "codebook_size": 8192})
    with pytest.raises(ValueError, match=r"unknown/config.json: unknown MAGVIT-v2 config keys \['codebook_size'\]"):
        load_image_tokenizer(unknown)
    broken = copy_dir(path, tmp_path / "broken")
    (broken / "config.json").write_text('{"_class_name": "MAGVITv2",')
    with pytest.raises(ValueError, match=r"broken/config.json: not valid JSON"):
        load_image_tokenizer(broken)
    with pytest.raises(FileNotFoundError, match="is missing config.json"):
        load_image_tokenizer(tmp_path / "nowhere")
    # A config for other sizes than the weights: the mismatch is reported, not a half-loaded model.
    wrong = copy_dir(path, tmp_path / "wrong", config={**json.loads((path / "config.json").read_text()),
                                                          "z_channels": 7})
    with pytest.raises(ValueError, match="wrong shape for MAGVIT-v2"):
        load_image_tokenizer(wrong)


def test_reward_worker_and_image_grid_take_magvit2_as_they_take_the_vq(small, tmp_path):
    """One interface: the reward worker decodes generated MAGVIT-v2 codes in memory for CLIP, and the
    driver's image grid decodes them, exactly as with the tiny VQ."""
    import math

    from rewards.worker import RewardWorker
    from rl.data.tasks import make_rows
    from rl.tracking import save_image_grid

    model, path = small
    rows = make_rows("t2i", 2, seed=3, split="val")
    codes = model.encode(images(2)).tolist()
    worker = RewardWorker([{"name": "clip", "weight": 0.1, "key": "clip_score", "tasks": ["t2i"]}], ["clip_score"],
                          str(path))
    try:
        out = worker.score([r["prompt"] for r in rows], ["", ""], rows, codes)
    finally:
        worker.close()
    assert all(math.isfinite(v) for v in out.components["clip_score"])
    tok = load_image_tokenizer(path)
    grid = tmp_path / "grid.png"
    save_image_grid(grid, tok.decode(codes).numpy(), [r["prompt"] for r in rows], tok.decode(codes).numpy())
    assert grid.read_bytes()[:4] == b"\x89PNG"
