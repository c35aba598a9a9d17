"""A native LLaDA-architecture masked diffusion LM.

Parameter names follow LLaDA-8B / MMaDA-8B checkpoints (OLMo lineage, "llama" block type) so their
safetensors load into this class unchanged:

    model.transformer.wte.weight
    model.transformer.blocks.{i}.{attn_norm,ff_norm}.weight
    model.transformer.blocks.{i}.{q_proj,k_proj,v_proj,attn_out}.weight
    model.transformer.blocks.{i}.{ff_proj,up_proj,ff_out}.weight
    model.transformer.ln_f.weight
    model.transformer.ff_out.weight          (absent when weight_tying)

Attention is bidirectional: the only mask is the padding mask. For cached sampling (Fast-dLLM's
prefix and dual cache) `forward` can return every layer's keys/values and can run a window of
positions against keys/values cached for the rest of the sequence.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rl.errors import fail

# Per layer (keys, values), each [B, n_kv_heads, T, head_dim], keys after RoPE.
KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DiffusionLMOutput(ModelOutput):
    logits: torch.Tensor | None = None
    kv: KVCache | None = None  # this call's keys/values for its own positions (return_kv=True)


# The fields of LLaDA's own configuration (GSAI-ML/LLaDA-8B-Instruct configuration_llada.py, ModelConfig),
# beyond the shapes LLaDAConfig.__init__ names, with LLaDA-8B-Instruct's config.json values. LLaDA's
# LLaDAModelLM copies every ModelConfig field from its config, so a config.json that leaves one out gets
# ModelConfig's GPT-2-era default there (block_type "sequential", rope false, layer_norm_type "default",
# dropouts 0.1): a different network. Saving them all keeps an export loadable by LLaDA's code as well.
#
# REQUIRED: the one value of each field that this model computes; any other is rejected, never ignored.
REQUIRED = {
    "block_type": "llama",            # pre-norm block, separate q/k/v projections, SwiGLU with up_proj
    "activation_type": "silu",        # the gate of that SwiGLU ("swiglu" would split ff_proj in halves)
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,   # norms have a weight
    "rope": True,
    "rope_full_precision": True,      # rope_cos_sin / apply_rope rotate in float32
    "alibi": False,
    "attention_layer_norm": False,    # no q/k norms
    "include_qkv_bias": False,
    "input_emb_norm": False,          # no sqrt(d_model) scaling of the embeddings
    "scale_logits": False,
    "block_group_size": 1,            # >1 renames parameters to block_groups.{g}.{i}
    "attention_dropout": 0.0,         # the model has no dropout: a nonzero rate would train another model
    "residual_dropout": 0.0,
    "embedding_dropout": 0.0,
}
# INERT: read by LLaDA only for what this class does not do (initialising fresh weights, device and
# precision of its own training, flash-attn dispatch, ALiBi and q/k-norm options that the REQUIRED values
# switch off, a key/value cache LLaDA's forward refuses). Kept as given so an export says what LLaDA's
# code will read; this class initialises fresh weights from normal(init_std) whatever init_fn says.
INERT = {
    "alibi_bias_max": 8.0,
    "attention_layer_norm_with_affine": True,
    "flash_attention": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "precision": "amp_bf16",
    "use_cache": False,
}
# Every LLaDA field: the above, the shapes and ids LLaDAConfig.__init__ takes (mlp_ratio only sizes the MLP
# when mlp_hidden_size is null), eos/pad ids, and the two with a rule of their own (see __init__).
LLADA_FIELDS = frozenset(REQUIRED) | frozenset(INERT) | {
    "d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_ratio", "mlp_hidden_size", "max_sequence_length",
    "rope_theta", "rms_norm_eps", "vocab_size", "embedding_size", "weight_tying", "include_bias",
    "init_std", "mask_token_id", "eos_token_id", "pad_token_id", "multi_query_attention", "bias_for_layer_norm",
}
LLADA_EOS_ID = 126081  # LLaDA-8B's <|endoftext|>, also its padding


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        n_layers: int = 32,
        mlp_hidden_size: int | None = 12288,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        mask_token_id: int = 126336,
        weight_tying: bool = False,
        max_sequence_length: int = 4096,
        init_std: float = 0.02,
        include_bias: bool = False,
        codebook_size: int = 0,
        num_vq_tokens: int = 0,
        mlp_ratio: int = 4,
        multi_query_attention: bool | None = None,
        bias_for_layer_norm: bool | None = False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_heads = n_heads
        # LLaDA's effective_n_kv_heads: multi_query_attention, when set, means 1 (true) or n_heads (false)
        # key/value heads, and must agree with an n_kv_heads given alongside it.
        self.multi_query_attention = multi_query_attention
        implied = None if multi_query_attention is None else 1 if multi_query_attention else n_heads
        self.n_kv_heads = n_kv_heads if n_kv_heads is not None else implied if implied is not None else n_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        # LLaDA sizes the MLP as mlp_ratio * d_model only when mlp_hidden_size is null (LLaDA-8B sets both:
        # 12288 and 4, and 12288 is what its weights have).
        if mlp_hidden_size is None:
            if not _number(mlp_ratio) or not isinstance(mlp_ratio, int) or mlp_ratio < 1:
                fail("LLaDAConfig.mlp_ratio", mlp_ratio, "expected a positive integer (mlp_hidden_size is null)")
            mlp_hidden_size = mlp_ratio * d_model
        self.mlp_hidden_size = mlp_hidden_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size if embedding_size is not None else vocab_size
        self.mask_token_id = mask_token_id
        self.weight_tying = weight_tying
        self.max_sequence_length = max_sequence_length
        self.init_std = init_std
        self.include_bias = include_bias
        # null inherits include_bias in LLaDA's norms: no bias either way here.
        self.bias_for_layer_norm = bias_for_layer_norm
        # Unified tokens (MMaDA): `codebook_size` vocabulary rows are image codes; code c is token
        # len(tokenizer) + c (rl.models.tokenizer.image_token_offset: the offset depends on the tokenizer,
        # not on this config); `num_vq_tokens` codes make one image (MMaDA-8B: 8192 codes at 126,349 ..
        # 134,540 of 134,656 rows, 1024 tokens per 512 px image). 0 = a text-only model.
        self.codebook_size = codebook_size
        self.num_vq_tokens = num_vq_tokens
        for key, value in {**REQUIRED, **INERT}.items():
            setattr(self, key, kwargs.pop(key, value))
        kwargs.setdefault("eos_token_id", LLADA_EOS_ID)
        kwargs.setdefault("pad_token_id", LLADA_EOS_ID)
        kwargs.setdefault("tie_word_embeddings", weight_tying)
        super().__init__(**kwargs)
        self.validate_shape()
        self.validate_architecture()

    def validate_shape(self) -> None:
        def bad(key, why):
            fail(f"LLaDAConfig.{key}", getattr(self, key), why)

        for key in ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "vocab_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "expected a positive integer")
        if self.d_model % self.n_heads:
            bad("d_model", f"must be divisible by n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            bad("n_heads", "head dimension d_model/n_heads must be even for RoPE")
        if self.n_heads % self.n_kv_heads:
            bad("n_kv_heads", f"must divide n_heads={self.n_heads}")
        if self.embedding_size < self.vocab_size:
            bad("embedding_size", f"must be >= vocab_size={self.vocab_size}")
        if not 0 <= self.mask_token_id < self.embedding_size:
            bad("mask_token_id", f"must be a token id in [0, {self.embedding_size})")
        for key in ("codebook_size", "num_vq_tokens"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                bad(key, "expected an integer >= 0 (0 = text only)")
        if self.codebook_size and not 0 < self.codebook_size < self.vocab_size:
            bad("codebook_size", f"image codes follow the text tokens: must be < vocab_size={self.vocab_size}")
        if self.include_bias:
            bad("include_bias", "LLaDA checkpoints have no biases; only False is supported")

    def validate_architecture(self) -> None:
        """LLaDA's switches that change the network: only the values this model implements pass."""
        for key, want in REQUIRED.items():
            value = getattr(self, key)
            # type too, so that true never passes for 1 nor 0 for false
            if value != want or (type(value) is not type(want) and not (isinstance(want, float) and _number(value))):
                fail(f"LLaDAConfig.{key}", value, f"only {want!r} is supported (LLaDA-8B's value)")
        if self.multi_query_attention is not None:
            implied = 1 if self.multi_query_attention else self.n_heads
            if not isinstance(self.multi_query_attention, bool) or self.n_kv_heads != implied:
                fail("LLaDAConfig.multi_query_attention", self.multi_query_attention,
                     f"means {implied} key/value heads but n_kv_heads={self.n_kv_heads}; "
                     "null (LLaDA-8B's value) lets n_kv_heads alone decide")
        if self.bias_for_layer_norm not in (None, False):
            fail("LLaDAConfig.bias_for_layer_norm", self.bias_for_layer_norm,
                 "norms have no bias here; only false or null is supported")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as LLaDA does, so bf16 weights give the same statistics.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float):
    """float32 cos/sin [B, 1, T, head_dim] for the given positions, whatever the model's dtype.

    LLaDA's config sets rope_full_precision: its RotaryEmbedding builds sin/cos in float32 (autocast
    off) and rotates q and k in float32. Rounding sin/cos to bf16 instead moved bf16 logits by up to
    0.5 against LLaDA's (argmax agreement 99.2 %)."""
    dims = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (dims / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, hd]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x in float32 and cast back to x's dtype, in LLaDA's order (rope_full_precision:
    q.float(), (t * cos) + (rotate_half(t) * sin), then .type_as(q)). A no-op cast in float32."""
    # Half-split rotation (not interleaved), the layout LLaDA's rotary embedding uses.
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig):
        super().__init__()
        d, hd = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache=None, span=None):
        """`cache` (keys, values) covers the whole sequence; x holds positions span=(lo, hi) of it, whose
        fresh keys/values replace the cached ones for this call. Returns (x, this call's (k, v))."""
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        fresh = (k, v)
        if cache is not None:
            (ck, cv), (lo, hi) = cache, span
            k = torch.cat([ck[:, :, :lo], k, ck[:, :, hi:]], dim=2)
            v = torch.cat([cv[:, :, :lo], v, cv[:, :, hi:]], dim=2)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(B, T, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)), fresh


class LLaDAModel(nn.Module):
    """Holds `transformer` so that parameter paths read `model.transformer.*` as in LLaDA."""

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        modules = dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        )
        if not config.weight_tying:
            modules["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=False)
        self.transformer = nn.ModuleDict(modules)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    # transformers' activation_checkpointing_enable() (gradient_checkpointing_enable()) sets the flag
    # below and _gradient_checkpointing_func, non-reentrant by default: no input needs a gradient,
    # so LoRA's frozen embeddings are fine, and ZeRO-3 re-gathers a block's weights on recompute.
    supports_gradient_checkpointing = True

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _init_weights(self, module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_span: tuple[int, int] | None = None,
        return_kv: bool = False,
        logits_span: tuple[int, int] | None = None,
        **_unused,
    ) -> DiffusionLMOutput:
        """With `kv_cache` (from an earlier return_kv=True call over the full sequence), input_ids are the
        tokens at positions cache_span=(lo, hi) only; attention_mask and position_ids, when given, still
        cover the full sequence. Keys outside the span come from the cache: Fast-dLLM's approximation.
        `logits_span=(a, b)` computes the head for input positions a..b only: a sampler needs one
        block's logits, and [B, T, vocab] of them is most of the memory at LLaDA's 126k vocabulary."""
        t = self.model.transformer

        def head():
            return t.wte.weight if self.config.weight_tying else t.ff_out.weight

        return transformer_forward(
            self, t.wte(input_ids), t.blocks, t.ln_f, head, attention_mask=attention_mask, position_ids=position_ids,
            kv_cache=kv_cache, cache_span=cache_span, return_kv=return_kv, logits_span=logits_span,
        )


def transformer_forward(
    model: PreTrainedModel,
    x: torch.Tensor,
    blocks,
    final_norm: nn.Module,
    head: Callable[[], torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    kv_cache: KVCache | None = None,
    cache_span: tuple[int, int] | None = None,
    return_kv: bool = False,
    logits_span: tuple[int, int] | None = None,
) -> DiffusionLMOutput:
    """LLaDAModelLM.forward from the input embeddings x [B, T, d] on: RoPE positions, the padding mask,
    LLaDABlock-compatible `blocks`, `final_norm` and `head()`, the head weight [vocab, d]: read only when the
    logits are computed, since under ZeRO-3 a weight read earlier is released again by its module's forward
    (the tied embedding's). Shared by every model
    with this trunk (LLaDA, LLaDA-V), so the cache and span semantics are one code path. `model` supplies
    config.d_model / n_heads / rope_theta and the gradient checkpointing switches."""
    B, T = x.shape[:2]
    full_T = T if kv_cache is None else kv_cache[0][0].shape[2]
    if kv_cache is not None and (cache_span is None or cache_span[1] - cache_span[0] != T):
        raise ValueError(f"kv_cache needs cache_span=(lo, hi) with hi - lo = {T} input positions, got {cache_span}")
    if position_ids is None:
        if attention_mask is None:
            position_ids = torch.arange(full_T, device=x.device).expand(B, full_T)
        else:
            # Left padding shifts positions, so a padded row sees the same RoPE phases as unpadded.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    if kv_cache is not None and position_ids.shape[1] == full_T:
        position_ids = position_ids[:, cache_span[0]:cache_span[1]]
    config = model.config
    cos, sin = rope_cos_sin(position_ids, config.d_model // config.n_heads, config.rope_theta)
    attn_mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        attn_mask = attention_mask.bool()[:, None, None, :]  # keys only: attention is bidirectional
    kv = []
    # Only a training forward that builds a graph recomputes its blocks in backward; no_grad passes
    # (old/ref log-probs, every sampler and its key/value caches) run the blocks directly.
    checkpointed = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    for i, block in enumerate(blocks):
        args = (x, cos, sin, attn_mask, None if kv_cache is None else kv_cache[i], cache_span)
        x, fresh = model._gradient_checkpointing_func(block.__call__, *args) if checkpointed else block(*args)
        if return_kv:
            kv.append(fresh)
    if logits_span is not None:
        x = x[:, logits_span[0]:logits_span[1]]
    x = final_norm(x)
    logits = F.linear(x, head())
    return DiffusionLMOutput(logits=logits, kv=kv if return_kv else None)
