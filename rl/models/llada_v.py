"""LLaDA-V: a SigLIP vision tower, an MLP projector and the LLaDA-8B masked diffusion LM (GSAI-ML/LLaDA-V).

Parameter names are those of GSAI-ML/LLaDA-V's safetensors (LLaVA-style code, LLaMA-style LM names), so the
published checkpoint loads unchanged and `save_pretrained` writes the same names back:

    model.embed_tokens.weight
    model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj}.weight
    model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}.weight
    model.layers.{i}.{input_layernorm,post_attention_layernorm}.weight
    model.norm.weight
    lm_head.weight
    model.mm_projector.{0,2}.{weight,bias}                      (mlp2x_gelu: Linear, GELU, Linear)
    model.image_newline                                         (when mm_patch_merge_type contains "unpad")
    model.vision_tower.vision_tower.vision_model.{embeddings,encoder.layers.{j},post_layernorm}.*

The language model is LLaDA-8B's: the blocks run rl.models.llada's LLaDABlock math (RoPE, RMSNorm, SwiGLU,
bidirectional attention) under LLaMA names, and the trunk is llada.transformer_forward, so kv-cache windows and
logits spans behave exactly as in LLaDAModelLM.

The tower holds only the layers its features need. LLaDA-V's SigLIP tower deletes the last of its 27 encoder
layers and its pooling head and takes the last remaining hidden state (= hidden_states[-2] of the full tower,
mm_vision_select_layer -2): the published checkpoint has 26 layers and no head.* tensors, and this class builds
the same 26 (generally: enough layers for `mm_vision_select_layer`, no SigLIP head).

Images enter the sequence as placeholders: input id -(1 + k) is row k of `image_features.reshape(-1,
mm_hidden_size)` (the tower's features, see `encode_images`) passed through the projector; IMAGE_NEWLINE_ID puts
`model.image_newline` there. `image_placeholder_ids(i)` gives the ids of image i in LLaDA-V's layout.

The vision tower's architecture comes from a `vision_config` dict in config.json (any transformers vision config
with a model_type, e.g. SiglipVisionConfig(...).to_dict()). GSAI-ML/LLaDA-V's config.json has none: it names the
tower by hub id (mm_vision_tower "google/siglip2-so400m-patch14-384"); the architectures of that id and of
"google/siglip-so400m-patch14-384" are built in, so the published checkpoint loads with no download. Another id
needs a `vision_config` or a local tower folder as mm_vision_tower.

image_aspect_ratio: LLaDA-V was trained with "anyres_max_4" (a base view plus up to 6x6 384px crops, unpadded,
with image_newline after every row of patches: a variable number of positions per image). That tiling is not
implemented: a config saying anyres* is refused with a ValueError. Override it to load the published weights
(image_newline included) and use one 384px view per image, LLaDA-V's own single-crop path:

    load_model(path, image_aspect_ratio="square")         # or "pad", or None
    LLaDAVConfig.from_pretrained(path, image_aspect_ratio="pad")

"pad": the caller pads the image to a square with (127, 127, 127) (int(0.5 * 255), SigLIP's mean) and resizes
it to image_size (bicubic, as LLaDA-V's SigLipImageProcessor); "square"/None: resize only.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from rl.batch import IMAGE_NEWLINE
from rl.errors import fail

from .llada import LLADA_EOS_ID, DiffusionLMOutput, KVCache, LLaDABlock, RMSNorm, transformer_forward

# The placeholder id of LLaDA-V's image_newline embedding. Every other negative id -(1 + k) is feature row k;
# this one would be row 2**31 - 1, more rows than any batch of images has.
IMAGE_NEWLINE_ID = IMAGE_NEWLINE

# LLaDA-V's conversation template (conversation.py conv_llava_llada, used by its demo and evaluation): this system
# message, then LLaDA's chat format with "<image>\n" before the question.
LLADA_V_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                  "that the user provides, and assist the user with a variety of tasks using natural language.")

# Hub ids whose tower architecture is known here, so a config naming one needs no download. LLaDA-V's
# SigLipVisionConfig defaults (siglip_encoder.py) and the hub's google/siglip-so400m-patch14-384 vision_config;
# LLaDA-V trains with google/siglip2-so400m-patch14-384, the fixed-resolution SigLIP2 of the same shapes.
_SO400M_384 = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, attention_dropout=0.0,
)
KNOWN_TOWERS = {
    "google/siglip-so400m-patch14-384": _SO400M_384,
    "google/siglip2-so400m-patch14-384": _SO400M_384,
}
# Pixel normalisation by tower type: SigLIP's image processor (LLaDA-V's SigLipImageProcessor: rescale 1/255,
# mean 0.5, std 0.5 per channel) and CLIP's. Any other tower needs image_mean / image_std in the config.
NORMALISATION = {
    "siglip_vision_model": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip_vision_model": (tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)),
}
# image_aspect_ratio values with one tower-sized view per image (None: LLaDA-V's default, a plain resize).
SINGLE_VIEW_ASPECT_RATIOS = (None, "square", "pad")
# LLaDA-V's language-model switches that change the network: only these values are computed here.
LM_REQUIRED = {"hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0}
# LoRA's target_modules for the language model's projections (peft matches the regex against whole module
# names): rl.lora's LORA_TARGETS names LLaDA's blocks; the tower's encoder.layers.N.self_attn.q_proj must stay
# out, which anchoring at model.layers does.
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
# Keys from_dict/from_pretrained treat themselves; every other keyword there overrides a config.json value.
_FROM_DICT_OWN = {
    "return_unused_kwargs", "num_labels", "attn_implementation", "experts_implementation", "output_attentions",
    "torch_dtype", "dtype", "name_or_path",
}


class LLaDAVConfig(PretrainedConfig):
    """GSAI-ML/LLaDA-V's config.json as published (LLaVA's mm_* keys, LLaMA-style LM keys). Defaults are
    LLaDA-V-8B's values except image_aspect_ratio (see the module docstring). LLaDA-project code reads the LM
    shapes under LLaDAConfig's names too (d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size, ...)."""

    model_type = "llava_llada"
    sub_configs = {"vision_config": AutoConfig}
    attribute_map = {
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "n_layers": "num_hidden_layers",
        "mlp_hidden_size": "intermediate_size",
        "max_sequence_length": "max_position_embeddings",
        "embedding_size": "vocab_size",
        "weight_tying": "tie_word_embeddings",
        "init_std": "initializer_range",
    }

    def __init__(
        self,
        vocab_size: int = 126464,
        hidden_size: int = 4096,
        intermediate_size: int = 12288,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        num_key_value_heads: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 16384,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 500000.0,
        rope_scaling: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        pretraining_tp: int = 1,
        mask_token_id: int = 126336,
        mm_vision_tower: str | None = "google/siglip2-so400m-patch14-384",
        vision_config: dict | PretrainedConfig | None = None,
        mm_hidden_size: int | None = None,
        mm_projector_type: str = "mlp2x_gelu",
        mm_vision_select_layer: int = -2,
        mm_vision_select_feature: str = "patch",
        mm_patch_merge_type: str = "spatial_unpad",
        mm_resampler_type: str | None = None,
        mm_use_im_start_end: bool = False,
        add_faster_video: bool = False,
        image_aspect_ratio: str | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        system_prompt: str | None = LLADA_V_SYSTEM,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        if rope_scaling is not None:
            # Not stored: transformers 5 configs keep rope_scaling as an alias of their rope_parameters.
            fail("LLaDAVConfig.rope_scaling", rope_scaling, "only null (plain RoPE, LLaDA-V's value) is supported")
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.pretraining_tp = pretraining_tp  # LLaDA-V's tensor-parallel slicing: the same products either way
        self.mask_token_id = mask_token_id
        self.mm_vision_tower = mm_vision_tower
        self.vision_config = _resolve_vision_config(vision_config, mm_vision_tower)
        self.mm_hidden_size = self.vision_config.hidden_size if mm_hidden_size is None else mm_hidden_size
        self.mm_projector_type = mm_projector_type
        self.mm_vision_select_layer = mm_vision_select_layer
        self.mm_vision_select_feature = mm_vision_select_feature
        self.mm_patch_merge_type = mm_patch_merge_type
        self.mm_resampler_type = mm_resampler_type
        self.mm_use_im_start_end = mm_use_im_start_end
        self.add_faster_video = add_faster_video
        self.image_aspect_ratio = image_aspect_ratio
        # The system message of the model's conversation template (not a key of LLaDA-V's config.json, whose
        # template, conv_llava_llada, always sends LLADA_V_SYSTEM; null = none, as the tiny model is trained).
        self.system_prompt = system_prompt
        default_mean, default_std = NORMALISATION.get(self.vision_config.model_type, (None, None))
        self.image_mean = list(default_mean) if image_mean is None and default_mean else image_mean
        self.image_std = list(default_std) if image_std is None and default_std else image_std
        kwargs.setdefault("eos_token_id", LLADA_EOS_ID)
        kwargs.setdefault("pad_token_id", LLADA_EOS_ID)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate_language_model()
        self.validate_multimodal()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # transformers applies keyword overrides after constructing from config.json, so a value this class
        # refuses (image_aspect_ratio "anyres_max_4") could never be overridden: merge them in first.
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k not in _FROM_DICT_OWN and not k.startswith("_")}
        return super().from_dict({**config_dict, **overrides}, **kwargs)

    # --- derived numbers --------------------------------------------------------------------------------

    @property
    def image_size(self) -> int:
        """The tower's input size: encode_images takes uint8 [n, image_size, image_size, 3]."""
        return self.vision_config.image_size

    @property
    def patch_size(self) -> int:
        return self.vision_config.patch_size

    @property
    def tokens_per_image(self) -> int:
        """Feature rows per image: one per patch."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def image_newline_after_image(self) -> bool:
        """LLaDA-V's single-view path (llava_arch.py, images given as a list, as its demo and evaluation do)
        appends model.image_newline after an image's rows when mm_patch_merge_type contains "unpad"."""
        return "unpad" in self.mm_patch_merge_type

    @property
    def tower_layers(self) -> int:
        """Encoder layers the tower keeps: those up to mm_vision_select_layer (hidden_states[0] is the
        embedding output, hidden_states[i] the output of layer i)."""
        n, sel = self.vision_config.num_hidden_layers, self.mm_vision_select_layer
        return n + 1 + sel if sel < 0 else sel

    # Not a unified-token (MMaDA) model: no image codes in the vocabulary.
    codebook_size = 0
    num_vq_tokens = 0

    # --- checks -------------------------------------------------------------------------------------------

    def validate_language_model(self) -> None:
        def bad(key, why):
            fail(f"LLaDAVConfig.{key}", getattr(self, key), why)

        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "pretraining_tp"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(key, "expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            bad("hidden_size", f"must be divisible by num_attention_heads={self.num_attention_heads}")
        if (self.hidden_size // self.num_attention_heads) % 2:
            bad("num_attention_heads", "head dimension hidden_size/num_attention_heads must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_key_value_heads", f"must divide num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.mask_token_id, int) or not 0 <= self.mask_token_id < self.vocab_size:
            bad("mask_token_id", f"must be a token id in [0, {self.vocab_size})")
        for key, want in LM_REQUIRED.items():
            value = getattr(self, key)
            if value != want or (type(value) is not type(want) and not isinstance(want, float)):
                bad(key, f"only {want!r} is supported (LLaDA-V's value)")
        if self.tie_word_embeddings:
            bad("tie_word_embeddings", "LLaDA-V has a separate lm_head; only false is supported")

    def validate_multimodal(self) -> None:
        def bad(key, why):
            fail(f"LLaDAVConfig.{key}", getattr(self, key), why)

        vc = self.vision_config
        for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers"):
            value = getattr(vc, key, None)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"LLaDAVConfig.vision_config.{key}", value, "expected a positive integer (tower architecture)")
        if self.mm_hidden_size != vc.hidden_size:
            bad("mm_hidden_size", f"must equal the vision tower's hidden_size={vc.hidden_size}")
        if not (self.mm_projector_type == "linear" or re.fullmatch(r"mlp[1-9]\d*x_gelu", str(self.mm_projector_type))):
            bad("mm_projector_type", "supported: 'mlp<N>x_gelu' (LLaDA-V: mlp2x_gelu) or 'linear'")
        sel, layers = self.mm_vision_select_layer, vc.num_hidden_layers
        if not isinstance(sel, int) or isinstance(sel, bool) or not -(layers + 1) <= sel <= layers:
            bad("mm_vision_select_layer",
                f"expected an index into the tower's {vc.num_hidden_layers + 1} hidden states (LLaDA-V: -2)")
        if self.mm_vision_select_feature != "patch":
            bad("mm_vision_select_feature", "only 'patch' is supported (LLaDA-V's value)")
        merge = self.mm_patch_merge_type
        if not isinstance(merge, str) or not (merge == "flat" or merge.startswith("spatial")):
            bad("mm_patch_merge_type", "expected 'flat' or 'spatial...' (LLaDA-V: 'spatial_unpad')")
        if self.mm_resampler_type is not None:
            bad("mm_resampler_type", "only null (no resampler, LLaDA-V's value) is supported")
        if self.mm_use_im_start_end:
            bad("mm_use_im_start_end", "image start/end tokens are not supported (LLaDA-V: false)")
        if self.add_faster_video:
            bad("add_faster_video", "video tokens are not supported (LLaDA-V: false)")
        if self.image_aspect_ratio not in SINGLE_VIEW_ASPECT_RATIOS:
            bad("image_aspect_ratio",
                "only one tower-sized view per image is implemented: 'square', 'pad' or null work; anyres tiling "
                "(LLaDA-V's published 'anyres_max_4') does not. Override it to load this checkpoint: "
                "model.config_overrides={image_aspect_ratio: square} in a run (conf/model/llada_v_8b.yaml), "
                "or rl.models.load_model(path, image_aspect_ratio='square')")
        for key in ("image_mean", "image_std"):
            value = getattr(self, key)
            if not (isinstance(value, (list, tuple)) and len(value) == getattr(vc, "num_channels", 3)
                    and all(isinstance(v, (int, float)) for v in value)):
                bad(key, f"expected {getattr(vc, 'num_channels', 3)} numbers: the pixel normalisation of a "
                         f"'{vc.model_type}' tower is not built in (known: {sorted(NORMALISATION)})")
        if any(v <= 0 for v in self.image_std):
            bad("image_std", "expected positive numbers")


def _resolve_vision_config(vision_config, tower: str | None) -> PretrainedConfig:
    """The tower's transformers config: the embedded one, a built-in hub id, or a local tower folder."""
    if isinstance(vision_config, PretrainedConfig):
        return vision_config
    if vision_config is not None:
        if not isinstance(vision_config, dict) or "model_type" not in vision_config:
            fail("LLaDAVConfig.vision_config", vision_config,
                 "expected a transformers vision config dict with a model_type (e.g. SiglipVisionConfig().to_dict())")
        return _vision_from_dict(vision_config, "LLaDAVConfig.vision_config")
    if tower in KNOWN_TOWERS:
        return AutoConfig.for_model(**KNOWN_TOWERS[tower])
    local = Path(str(tower)).expanduser() / "config.json" if tower else None
    if local is not None and local.is_file():
        try:
            d = json.loads(local.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{local}: not valid JSON ({e})") from None
        return _vision_from_dict(d, f"{local}")
    fail("LLaDAVConfig.mm_vision_tower", tower,
         "the vision tower's architecture is unknown and nothing is downloaded: add a `vision_config` dict to "
         "config.json (e.g. transformers.SiglipVisionConfig(...).to_dict()), or set mm_vision_tower to a local "
         f"folder holding the tower's config.json (built in: {sorted(KNOWN_TOWERS)})")


def _vision_from_dict(d: dict, where: str) -> PretrainedConfig:
    d = dict(d)
    # A whole image-text model's config (model_type "siglip", "clip"): its vision half.
    if isinstance(d.get("vision_config"), dict):
        d = dict(d["vision_config"])
        d.setdefault("model_type", None)
    model_type = d.pop("model_type", None)
    if model_type is None:
        fail(where, d, "a vision config needs its model_type (e.g. 'siglip_vision_model')")
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **d)
    except ValueError as e:
        raise ValueError(f"{where}: model_type={model_type!r} is not a transformers model type ({e})") from None


class _Attention(nn.Module):
    def __init__(self, config: LLaDAVConfig):
        super().__init__()
        d, hd = config.hidden_size, config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)


class _MLP(nn.Module):
    def __init__(self, config: LLaDAVConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)


class LLaDAVDecoderLayer(LLaDABlock):
    """LLaDABlock's computation under LLaDA-V's (LLaMA) parameter names: the names LLaDABlock.forward reads
    are views of these modules (LLaDA-V's rename_checkpoint.py pairs them the same way)."""

    def __init__(self, config: LLaDAVConfig):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.self_attn = _Attention(config)
        self.mlp = _MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    attn_norm = property(lambda self: self.input_layernorm)
    ff_norm = property(lambda self: self.post_attention_layernorm)
    q_proj = property(lambda self: self.self_attn.q_proj)
    k_proj = property(lambda self: self.self_attn.k_proj)
    v_proj = property(lambda self: self.self_attn.v_proj)
    attn_out = property(lambda self: self.self_attn.o_proj)
    ff_proj = property(lambda self: self.mlp.gate_proj)
    up_proj = property(lambda self: self.mlp.up_proj)
    ff_out = property(lambda self: self.mlp.down_proj)


class _VisionModel(nn.Module):
    """Holds the transformers vision model as `vision_model`, the path segment LLaDA-V's names carry
    (transformers 5's SiglipVisionModel keeps its embeddings/encoder at top level)."""

    def __init__(self, config: LLaDAVConfig):
        super().__init__()
        build = config.vision_config.to_dict()
        build["num_hidden_layers"] = config.tower_layers
        if build.get("model_type") == "siglip_vision_model":
            build["vision_use_head"] = False  # LLaDA-V replaces the pooling head by Identity
        self.vision_model = AutoModel.from_config(AutoConfig.for_model(**build))


class VisionTower(nn.Module):
    """model.vision_tower, as LLaDA-V's SigLipVisionTower: .vision_tower.vision_model is the encoder."""

    def __init__(self, config: LLaDAVConfig):
        super().__init__()
        self.vision_tower = _VisionModel(config)


def build_projector(config: LLaDAVConfig) -> nn.Module:
    """LLaDA-V's build_vision_projector: 'linear', or 'mlp<N>x_gelu' = Linear, (GELU, Linear) * (N - 1)."""
    if config.mm_projector_type == "linear":
        return nn.Linear(config.mm_hidden_size, config.hidden_size)
    depth = int(re.fullmatch(r"mlp(\d+)x_gelu", config.mm_projector_type).group(1))
    modules = [nn.Linear(config.mm_hidden_size, config.hidden_size)]
    for _ in range(1, depth):
        modules += [nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)]
    return nn.Sequential(*modules)


class LLaDAVModel(nn.Module):
    """`model.*`: the LM trunk, the tower, the projector and image_newline, under LLaDA-V's names."""

    def __init__(self, config: LLaDAVConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDAVDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.vision_tower = VisionTower(config)
        self.mm_projector = build_projector(config)
        if config.image_newline_after_image:
            self.image_newline = nn.Parameter(torch.empty(config.hidden_size))


class LLaDAVModelLM(PreTrainedModel):
    config_class = LLaDAVConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["LLaDAVDecoderLayer"]
    _supports_sdpa = True
    supports_gradient_checkpointing = True

    def __init__(self, config: LLaDAVConfig):
        super().__init__(config)
        self.model = LLaDAVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()
        self.freeze_vision_tower()

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDAVModel) and hasattr(module, "image_newline"):
            # llava_arch.py initialize_vision_modules: randn * 1/sqrt(hidden_size)
            nn.init.normal_(module.image_newline, mean=0.0, std=1.0 / math.sqrt(self.config.hidden_size))

    def freeze_vision_tower(self, frozen: bool = True) -> None:
        """The tower is frozen for RL (LLaDA-V's SigLipVisionTower also sets requires_grad_(False)):
        encode_images then runs without a graph. freeze_vision_tower(False) trains it."""
        self.vision_model.requires_grad_(not frozen)

    @property
    def vision_model(self) -> nn.Module:
        """The transformers vision encoder (model.vision_tower.vision_tower.vision_model)."""
        return self.model.vision_tower.vision_tower.vision_model

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    @property
    def positions_per_image(self) -> int:
        """Sequence positions one image takes in LLaDA-V's single-view layout (rows + image_newline)."""
        return self.config.tokens_per_image + int(self.config.image_newline_after_image)

    def image_placeholder_ids(self, image: int) -> list[int]:
        """Input ids standing for image number `image` of the batch's image_features: its feature rows, then
        IMAGE_NEWLINE_ID where LLaDA-V appends image_newline. They replace "<image>" in the tokenized prompt."""
        n = self.config.tokens_per_image
        ids = [-(1 + image * n + j) for j in range(n)]
        return ids + [IMAGE_NEWLINE_ID] * int(self.config.image_newline_after_image)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    # --- images ---------------------------------------------------------------------------------------------

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [n, image_size, image_size, 3] -> the tower's features [n, tokens_per_image, mm_hidden_size]
        at mm_vision_select_layer (patch tokens, before the projector), in the tower's dtype. Normalised as the
        tower's image processor does: rescale 1/255, then (x - image_mean) / image_std per channel. No graph
        through a frozen tower."""
        s = self.config.image_size
        channels = len(self.config.image_mean)
        if not isinstance(pixels, torch.Tensor) or pixels.dtype != torch.uint8 or tuple(pixels.shape[1:]) != (
                s, s, channels) or pixels.dim() != 4:
            got = f"{pixels.dtype} {tuple(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"encode_images expects a uint8 tensor [n, {s}, {s}, {channels}] (RGB at the tower's "
                             f"input size, config.image_size={s}); got {got}")
        tower = self.vision_model
        weight = next(tower.parameters())
        mean = torch.tensor(self.config.image_mean, device=weight.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.image_std, device=weight.device).view(1, -1, 1, 1)
        x = pixels.to(weight.device).permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        x = ((x - mean) / std).to(weight.dtype)
        trainable = any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            hidden = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        if hidden.shape[1] == self.config.tokens_per_image + 1:
            hidden = hidden[:, 1:]  # a CLS token first ('patch' features drop it)
        return hidden

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """mm_projector on features [..., mm_hidden_size], in the projector's dtype and on its device."""
        weight = next(self.model.mm_projector.parameters())
        return self.model.mm_projector(features.to(device=weight.device, dtype=weight.dtype))

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, with projected image features at the placeholder ids (see the module docstring)."""
        emb = self.model.embed_tokens
        placeholders = input_ids < 0
        if not bool(placeholders.any()):
            return emb(input_ids)
        x = emb(input_ids.clamp_min(0))
        newline = input_ids == IMAGE_NEWLINE_ID
        rows = placeholders & ~newline
        if bool(rows.any()):
            if image_features is None:
                raise ValueError(f"input_ids hold {int(rows.sum())} image placeholders (ids < 0) but image_features "
                                 f"is None")
            d = self.config.mm_hidden_size
            if image_features.shape[-1] != d:
                raise ValueError(f"image_features must end in mm_hidden_size={d}, got {tuple(image_features.shape)}")
            feats = image_features.reshape(-1, d)
            k = -(input_ids[rows] + 1)
            top = int(k.max())
            if top >= feats.shape[0]:
                raise ValueError(f"image placeholder id {-(top + 1)} refers to feature row {top}, but image_features "
                                 f"hold {feats.shape[0]} rows (ids -1 .. -{feats.shape[0]})")
            projected = self.project(feats).to(x.dtype)
            x = x.index_put((rows,), projected[k])
        if bool(newline.any()):
            if not hasattr(self.model, "image_newline"):
                raise ValueError(f"IMAGE_NEWLINE_ID in input_ids, but this model has no image_newline "
                                 f"(mm_patch_merge_type={self.config.mm_patch_merge_type!r} has no 'unpad')")
            n = int(newline.sum())
            x = x.index_put((newline,), self.model.image_newline.to(x.dtype).expand(n, -1))
        return x

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_span: tuple[int, int] | None = None,
        return_kv: bool = False,
        logits_span: tuple[int, int] | None = None,
        image_features: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **_unused,
    ) -> DiffusionLMOutput:
        """LLaDAModelLM.forward's semantics (kv_cache windows, cache_span, return_kv, logits_span), plus image
        placeholders in input_ids (ids < 0, see `embed`); input without them ignores image_features.
        `inputs_embeds` [B, T, hidden_size] instead of input_ids runs the trunk on given embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids, image_features) if inputs_embeds is None else inputs_embeds
        m = self.model
        return transformer_forward(
            self, x, m.layers, m.norm, lambda: self.lm_head.weight, attention_mask=attention_mask,
            position_ids=position_ids,
            kv_cache=kv_cache, cache_span=cache_span, return_kv=return_kv, logits_span=logits_span,
        )
