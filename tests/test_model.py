import json

import pytest
import torch

from rl.models import check_checkpoint_dir, load_checkpoint
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import EOT, MASK, end_token_ids, train_tokenizer

torch.set_num_threads(1)


def tiny_config(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=64,
                mask_token_id=3, rope_theta=10000.0)
    return LLaDAConfig(**{**base, **kw})


def test_parameter_names_follow_llada_checkpoints():
    names = set(LLaDAModelLM(tiny_config(weight_tying=False)).state_dict())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"}
    for i in range(2):
        for part in ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
            expected.add(f"model.transformer.blocks.{i}.{part}.weight")
    assert names == expected
    tied = set(LLaDAModelLM(tiny_config(weight_tying=True)).state_dict())
    assert tied == expected - {"model.transformer.ff_out.weight"}


def test_gqa_shapes_and_tied_head_uses_embedding():
    torch.manual_seed(0)
    m = LLaDAModelLM(tiny_config(weight_tying=True))
    assert m.model.transformer.blocks[0].k_proj.weight.shape == (2 * 8, 32)
    x = torch.randint(0, 64, (2, 7))
    logits = m(input_ids=x).logits
    assert logits.shape == (2, 7, 64)
    with torch.no_grad():
        m.model.transformer.wte.weight[5] += 10.0  # the tied head must see this row
    assert not torch.allclose(m(input_ids=x).logits[..., 5], logits[..., 5])


def test_attention_is_bidirectional():
    torch.manual_seed(0)
    m = LLaDAModelLM(tiny_config()).eval()
    x = torch.randint(0, 64, (1, 6))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 64
    # Changing the last token changes the first position's logits: no causal mask.
    assert not torch.allclose(m(input_ids=x).logits[0, 0], m(input_ids=y).logits[0, 0])


def test_left_padded_rows_match_unpadded():
    torch.manual_seed(0)
    m = LLaDAModelLM(tiny_config()).eval()
    short, long = torch.randint(4, 64, (1, 3)), torch.randint(4, 64, (1, 6))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = m(input_ids=batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0, 3:], m(input_ids=short).logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], m(input_ids=long).logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,key", [
    (dict(d_model=30), "d_model"), (dict(n_kv_heads=3), "n_kv_heads"), (dict(mask_token_id=64), "mask_token_id"),
    (dict(embedding_size=10), "embedding_size"), (dict(n_layers=0), "n_layers"),
    (dict(include_bias=True), "include_bias"),
])
def test_bad_config_values_are_named(kw, key):
    with pytest.raises(ValueError, match=f"LLaDAConfig.{key}="):
        tiny_config(**kw)


def test_llada_8b_config_shape_is_accepted():
    cfg = LLaDAConfig(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                      vocab_size=126464, embedding_size=126464, mask_token_id=126336, rope_theta=500000.0)
    assert cfg.n_kv_heads == 32 and cfg.mask_token_id == 126336


@pytest.fixture(scope="module")
def tokenizer():
    corpus = ["Ann has 12 apples and gets 3 more. How many now?", "<think>12+3=15</think><answer>15</answer>",
              "user assistant \n\n"] * 5
    return train_tokenizer(corpus, vocab_size=300)


def test_tokenizer_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.mask_token == MASK and tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert len(end_token_ids(tokenizer)) == 2 and tokenizer.convert_tokens_to_ids(EOT) in end_token_ids(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi 42"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi 42<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text  # byte-level: lossless round trip
    assert tokenizer.convert_ids_to_tokens(tokenizer("12", add_special_tokens=False)["input_ids"]) == ["1", "2"]


def test_checkpoint_round_trip_through_the_real_loading_path(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id)
    m = LLaDAModelLM(cfg).eval()
    m.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded, tok = load_checkpoint(tmp_path)
    x = torch.randint(0, len(tokenizer), (2, 5))
    torch.testing.assert_close(loaded(input_ids=x).logits, m(input_ids=x).logits)
    assert tok.padding_side == "left" and tok.mask_token_id == cfg.mask_token_id
    assert tok.chat_template == tokenizer.chat_template


def test_missing_checkpoint_files_are_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint_dir(tmp_path / "nope")
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing: config\.json, model weights"):
        load_checkpoint(tmp_path)


def test_mask_id_mismatch_between_config_and_tokenizer(tmp_path, tokenizer):
    LLaDAModelLM(tiny_config(vocab_size=len(tokenizer), mask_token_id=0)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mask_token_id=0"):
        load_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "llada"


def test_window_against_its_own_cache_equals_the_full_pass():
    """A cached window (Fast-dLLM's prefix/dual cache) is exact when the cache holds the same tokens:
    left padding, GQA and RoPE positions line up with the full forward."""
    torch.manual_seed(0)
    m = LLaDAModelLM(tiny_config(weight_tying=False)).eval()
    x = torch.randint(0, 64, (2, 12))
    attn = torch.ones(2, 12, dtype=torch.long)
    attn[0, :3] = 0
    with torch.no_grad():
        full = m(input_ids=x, attention_mask=attn, return_kv=True)
        assert len(full.kv) == 2 and full.kv[0][0].shape == (2, 2, 12, 8)  # [B, kv heads, T, head dim]
        for lo, hi in ((5, 9), (5, 12), (0, 12)):
            win = m(input_ids=x[:, lo:hi], attention_mask=attn, kv_cache=full.kv, cache_span=(lo, hi))
            torch.testing.assert_close(win.logits, full.logits[:, lo:hi], atol=1e-5, rtol=1e-5)
        part = m(input_ids=x, attention_mask=attn, logits_span=(4, 7)).logits  # the head on 3 positions only
        torch.testing.assert_close(part, full.logits[:, 4:7], atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cache_span"):
            m(input_ids=x[:, 5:9], attention_mask=attn, kv_cache=full.kv, cache_span=(5, 12))


def _llada_upstream_rotary(q, k, theta):
    """LLaDA's RotaryEmbedding.forward with rope_full_precision=True (modeling_llada.py), positions
    0..T-1: q and k cast to float32, sin/cos built in float32, rotated, cast back to q's dtype."""
    q_, k_ = q.float(), k.float()
    T, dim = k_.shape[-2], k_.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = torch.einsum("i , j -> i j", torch.arange(T, dtype=torch.float), inv_freq)
    positions = torch.cat((freqs, freqs), dim=-1)
    pos_sin, pos_cos = positions.sin()[None, None], positions.cos()[None, None]

    def rotate_half(x):
        B, nh, T_, hs = x.size()
        x1, x2 = x.view(B, nh, T_, 2, hs // 2).unbind(dim=-2)
        return torch.cat((-x2, x1), dim=-1)

    def apply(t):
        return ((t * pos_cos.type_as(t)) + (rotate_half(t) * pos_sin.type_as(t))).to(t.dtype)

    return apply(q_).type_as(q), apply(k_).type_as(k)


def _reference_logits(m, x):
    """The model's own weights run through LLaDA's block order, with LLaDA's rotary."""
    t, cfg = m.model.transformer, m.config
    h = t.wte(x)
    B, T = x.shape
    for blk in t.blocks:
        a = blk.attn_norm(h)
        q = blk.q_proj(a).view(B, T, blk.n_heads, blk.head_dim).transpose(1, 2)
        k = blk.k_proj(a).view(B, T, blk.n_kv_heads, blk.head_dim).transpose(1, 2)
        v = blk.v_proj(a).view(B, T, blk.n_kv_heads, blk.head_dim).transpose(1, 2)
        q, k = _llada_upstream_rotary(q, k, cfg.rope_theta)
        rep = blk.n_heads // blk.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=False)
        h = h + blk.attn_out(att.transpose(1, 2).reshape(B, T, -1))
        f = blk.ff_norm(h)
        h = h + blk.ff_out(torch.nn.functional.silu(blk.ff_proj(f)) * blk.up_proj(f))
    head = t.wte.weight if cfg.weight_tying else t.ff_out.weight
    return torch.nn.functional.linear(t.ln_f(h), head)


def test_bf16_rotary_matches_llada_full_precision_rope():
    """LLaDA's config has rope_full_precision: true. In bf16 the logits must equal LLaDA's rotary done
    its way (float32 sin/cos and rotation, cast back) bit for bit. With bf16 sin/cos and rotation this
    tiny model is off by 4e-3 (LLaDA-8B by up to 0.5). Long positions and LLaDA's theta make the
    phases, and so their bf16 rounding, matter."""
    torch.manual_seed(0)
    m = LLaDAModelLM(tiny_config(d_model=64, n_heads=4, n_kv_heads=2, rope_theta=500000.0,
                                 max_sequence_length=512)).eval().to(torch.bfloat16)
    x = torch.randint(0, 64, (2, 300))
    with torch.no_grad():
        ours, ref = m(input_ids=x).logits, _reference_logits(m, x)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, ref), (ours.float() - ref.float()).abs().max()


def test_load_model_refuses_a_checkpoint_it_would_not_load_whole(tmp_path):
    # transformers would drop the unknown tensor (and fill a missing one with random values) with a log line
    import shutil

    from safetensors.torch import load_file, save_file

    from rl.models import TINY_CHECKPOINT, load_model

    shutil.copytree(TINY_CHECKPOINT, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({**weights, "model.transformer.extra.weight": torch.zeros(2)}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: model.transformer.extra.weight"):
        load_model(tmp_path / "m")
