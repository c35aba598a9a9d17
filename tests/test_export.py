"""python -m rl.export: a training checkpoint or model folder as a plain Hugging Face LLaDA folder."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rl.export import export, main
from rl.models import TINY_CHECKPOINT, check_model_files, load_checkpoint
from rl.models.llada import INERT, LLADA_FIELDS, REQUIRED, LLaDAConfig, LLaDAModelLM

torch.set_num_threads(1)

# GSAI-ML/LLaDA-8B-Instruct's config.json (auto_map aside: it names configuration_llada.py and
# modeling_llada.py, which an export does not contain).
LLADA_8B = {
    "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 4096,
    "embedding_dropout": 0.0, "embedding_size": 126464, "eos_token_id": 126081, "flash_attention": False,
    "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None, "init_device": "meta",
    "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False, "layer_norm_type": "rms",
    "layer_norm_with_affine": True, "mask_token_id": 126336, "max_sequence_length": 4096,
    "mlp_hidden_size": 12288, "mlp_ratio": 4, "model_type": "llada", "multi_query_attention": None,
    "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "pad_token_id": 126081, "precision": "amp_bf16",
    "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
    "rope_theta": 500000.0, "scale_logits": False, "transformers_version": "4.46.3", "use_cache": False,
    "vocab_size": 126464, "weight_tying": False,
}
SHAPES = {"d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "max_sequence_length", "rope_theta",
          "vocab_size", "embedding_size", "weight_tying", "mask_token_id", "eos_token_id", "pad_token_id"}
# rl/models/llada.py's docstring: the parameter layout of LLaDA-8B / MMaDA-8B checkpoints
BLOCK_PARTS = ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-hf"
    export(TINY_CHECKPOINT, out, max_shard_size="1MB")  # the tiny model is 6 MB: several shards
    return out


def logits(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    mask = torch.ones_like(x)
    mask[0, :5] = 0  # left padding takes the masked-attention path too
    with torch.no_grad():
        return model(input_ids=x, attention_mask=mask).logits


def test_export_is_sharded_and_complete(exported):
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2 and all((exported / s).is_file() for s in shards)
    assert not (exported / "model.safetensors").exists()
    assert not exported.with_name(exported.name + ".tmp").exists()
    check_model_files(exported)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (exported / name).is_file()
    assert not (exported / "generation_config.json").exists()  # the tiny source has none to carry over


def test_transformers_auto_classes_load_the_export(exported):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    import rl.models  # noqa: F401  registers LLaDA with the Auto classes

    assert isinstance(AutoConfig.from_pretrained(exported), LLaDAConfig)
    model = AutoModel.from_pretrained(exported)
    assert type(model) is LLaDAModelLM
    assert type(AutoModelForCausalLM.from_pretrained(exported)) is LLaDAModelLM
    source_tok = AutoTokenizer.from_pretrained(TINY_CHECKPOINT)
    tok = AutoTokenizer.from_pretrained(exported)
    assert tok.chat_template == source_tok.chat_template and tok.chat_template
    assert tok.mask_token_id == model.config.mask_token_id and tok.get_vocab() == source_tok.get_vocab()


def test_export_gives_bit_identical_logits(exported):
    source, _ = load_checkpoint(TINY_CHECKPOINT)
    model, _ = load_checkpoint(exported)
    assert torch.equal(logits(model.eval()), logits(source.eval()))


def test_parameter_names_are_llada_layout(exported):
    config = json.loads((exported / "config.json").read_text())
    expected = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    expected |= {f"model.transformer.blocks.{i}.{part}.weight"
                 for i in range(config["n_layers"]) for part in BLOCK_PARTS}
    assert config["weight_tying"]  # the tiny model ties its head: no model.transformer.ff_out.weight
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == expected
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors |= load_file(exported / shard)
    source = load_file(TINY_CHECKPOINT / "model.safetensors")
    assert tensors.keys() == source.keys() and all(torch.equal(tensors[k], source[k]) for k in source)


def test_config_carries_every_llada_field_with_llada_values(exported):
    assert LLADA_FIELDS == set(LLADA_8B) - {"architectures", "model_type", "transformers_version"}
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LLaDAModelLM"] and config["model_type"] == "llada"
    assert "auto_map" not in config  # it would name code files the export does not hold
    assert LLADA_FIELDS <= set(config)
    assert {k: config[k] for k in LLADA_FIELDS - SHAPES} == {k: LLADA_8B[k] for k in LLADA_FIELDS - SHAPES}
    for shipped in ("tiny-llada", "tiny-mmada"):
        assert LLADA_FIELDS <= set(json.loads((TINY_CHECKPOINT.parent / shipped / "config.json").read_text()))


def test_llada_8b_config_json_is_accepted_and_is_the_default():
    given = {k: v for k, v in LLADA_8B.items() if k not in ("architectures", "transformers_version")}
    saved = LLaDAConfig(**given).to_diff_dict()
    default = LLaDAConfig().to_diff_dict()
    assert {k: saved[k] for k in LLADA_FIELDS} == {k: LLADA_8B[k] for k in LLADA_FIELDS}
    assert {k: default[k] for k in LLADA_FIELDS} == {k: LLADA_8B[k] for k in LLADA_FIELDS}
    assert set(REQUIRED) | set(INERT) <= LLADA_FIELDS


def tiny(**kw):
    base = dict(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48, vocab_size=64, mask_token_id=3)
    return LLaDAConfig(**{**base, **kw})


@pytest.mark.parametrize("key,value", [
    ("block_type", "sequential"), ("block_type", "parallel"), ("layer_norm_type", "default"),
    ("layer_norm_type", "gemma_rms"), ("activation_type", "gelu"), ("activation_type", "swiglu"),
    ("alibi", True), ("rope", False), ("rope_full_precision", False), ("include_qkv_bias", True),
    ("scale_logits", True), ("input_emb_norm", True), ("attention_layer_norm", True),
    ("layer_norm_with_affine", False), ("block_group_size", 2), ("attention_dropout", 0.1),
    ("residual_dropout", 0.1), ("embedding_dropout", 0.05), ("rope", 1), ("bias_for_layer_norm", True),
    ("multi_query_attention", True),  # 1 key/value head, but n_kv_heads=2
    ("multi_query_attention", False),  # n_heads key/value heads, but n_kv_heads=2
    ("include_bias", True),
])
def test_unsupported_llada_values_are_rejected_by_key(key, value):
    with pytest.raises(ValueError, match=f"LLaDAConfig.{key}={value!r}: "):
        tiny(**{key: value})


def test_settings_that_do_not_change_the_math_are_accepted():
    cfg = tiny(flash_attention=True, use_cache=True, init_fn="normal", init_device="cpu", precision=None,
               attention_dropout=0, init_cutoff_factor=3.0, alibi_bias_max=4.0, bias_for_layer_norm=None)
    assert cfg.flash_attention and cfg.init_fn == "normal"
    # LLaDA's rules: multi_query_attention fixes the key/value heads, mlp_ratio sizes a null mlp_hidden_size
    assert tiny(n_kv_heads=None, multi_query_attention=True).n_kv_heads == 1
    assert tiny(n_kv_heads=None, multi_query_attention=False).n_kv_heads == 4
    assert tiny(mlp_hidden_size=None, mlp_ratio=3).mlp_hidden_size == 96
    with pytest.raises(ValueError, match="LLaDAConfig.mlp_ratio=2.5"):
        tiny(mlp_hidden_size=None, mlp_ratio=2.5)


def test_unsupported_value_in_config_json_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "model"
    shutil.copytree(TINY_CHECKPOINT, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "layer_norm_type": "default"}))
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "LLaDAConfig.layer_norm_type='default': only 'rms' is supported" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_export_of_a_training_checkpoint_equals_its_policy(tmp_path):
    """A run's checkpoint holds the policy in global_step_N/actor/hf (rl/learner.py save(), LoRA merged:
    tests/test_learner.py checks that state_dict_for_rollout, the weights save() writes, merges adapters)."""
    from rl.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "run", keep_last=None).save(
        1, lambda p: shutil.copytree(TINY_CHECKPOINT, p / "actor" / "hf"), {})
    out = export(tmp_path / "run" / "checkpoints" / "global_step_1", tmp_path / "out")
    assert (out / "model.safetensors").is_file()  # under the 2GB default: one file, no index
    source, _ = load_checkpoint(TINY_CHECKPOINT)
    model, _ = load_checkpoint(out)
    assert torch.equal(logits(model), logits(source))
    assert export(tmp_path / "run", tmp_path / "out2").is_dir()  # the run itself: its newest intact step


def test_bfloat16_export(tmp_path):
    out = export(TINY_CHECKPOINT, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())
    model, _ = load_checkpoint(out)
    assert model.dtype == torch.bfloat16


def test_non_empty_out_dir_needs_force(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty"):
        export(TINY_CHECKPOINT, out)
    assert main([str(TINY_CHECKPOINT), str(out)]) == 2
    assert "is not empty (--force replaces it)" in capsys.readouterr().err
    assert main([str(TINY_CHECKPOINT), str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp or .old left behind
    (tmp_path / "empty").mkdir()
    assert export(TINY_CHECKPOINT, tmp_path / "empty").is_dir()  # an empty folder is taken as is


def test_a_crash_leaves_no_export_under_the_final_name(tmp_path, monkeypatch):
    import rl.export

    def crash(path):
        raise OSError("disk full")

    monkeypatch.setattr(rl.export, "_fsync_tree", crash)
    with pytest.raises(OSError, match="disk full"):
        export(TINY_CHECKPOINT, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    assert export(TINY_CHECKPOINT, tmp_path / "out").is_dir()  # the stale .tmp is replaced
    assert not (tmp_path / "out.tmp").exists()


@pytest.mark.parametrize("make,message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "is missing: config.json"),
    (lambda d: (d.mkdir(), (d / "adapter_config.json").write_text("{}")), "LoRA adapter"),
    (lambda d: (shutil.copytree(TINY_CHECKPOINT, d), (d / "model.safetensors").write_bytes(b"\0" * 4)),
     "truncated or not a safetensors file"),
    (lambda d: (shutil.copytree(TINY_CHECKPOINT, d), (d / "config.json").write_text(json.dumps(
        {**json.loads((TINY_CHECKPOINT / "config.json").read_text()), "n_layers": 7}))),
     "not a LLaDA checkpoint this model loads whole; missing keys: model.transformer.blocks.6"),
])
def test_bad_checkpoint_is_a_one_line_error(tmp_path, capsys, make, message):
    src = tmp_path / "src"
    make(src)
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rl.export: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_damaged_training_checkpoint_is_refused(tmp_path):
    from rl.checkpoint import CheckpointManager

    CheckpointManager(tmp_path / "run", keep_last=None).save(
        1, lambda p: shutil.copytree(TINY_CHECKPOINT, p / "actor" / "hf"), {})
    step = tmp_path / "run" / "checkpoints" / "global_step_1"
    weights = step / "actor" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # same size, different bytes
    with pytest.raises(ValueError, match="damaged.*model.safetensors"):
        export(step, tmp_path / "out")
