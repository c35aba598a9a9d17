"""Models: the LLaDA-architecture diffusion LM, LLaDA-V (vision tower + projector + LLaDA), their tokenizer,
and checkpoint loading: config.json's model_type picks the class."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .llada import LLaDAConfig, LLaDAModelLM
from .llada_v import LLaDAVConfig, LLaDAVModelLM
from .tokenizer import check_image_vocab

# The Auto classes LLaDA-8B's config.json maps to its LLaDAModelLM (auto_map: AutoConfig, AutoModel,
# AutoModelForCausalLM), so code written for LLaDA loads this one after `import rl.models`, with no
# trust_remote_code. (Despite the class name, LLaDA's forward is bidirectional, as this one is.)
AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
# LLaDA-V's model_type (its LlavaLLaDAConfig). Its published config.json maps the Auto classes to LLaDA's remote
# code, not to a multimodal class, so only this registration (or load_model) builds the whole model.
AutoConfig.register("llava_llada", LLaDAVConfig, exist_ok=True)
AutoModel.register(LLaDAVConfig, LLaDAVModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAVConfig, LLaDAVModelLM, exist_ok=True)

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "tiny-llada"
# The tiny model fine-tuned to write long answers (recipes/build_tiny_llada_long.py, task 'long').
TINY_LONG_CHECKPOINT = TINY_CHECKPOINT.with_name("tiny-llada-long")


def resolve_model_dir(path: str | Path) -> Path:
    """The model folder behind `path`: a folder holding config.json as it is, or a training run's
    checkpoint, whose policy is its Hugging Face export (LoRA merged) in actor/hf:
    .../global_step_N, .../global_step_N/actor, a run's checkpoints/ folder or the run folder itself
    (these two: the checkpoint resume=auto would take). A checkpoint whose files do not match its
    MANIFEST.json is an error naming the file, never loaded."""
    from rl.checkpoint import MANIFEST, CheckpointManager, damage

    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p
    step = p.parent if p.name == "actor" else p
    if not (step / "actor").is_dir():
        run = p.parent if p.name == "checkpoints" else p
        if (run / "checkpoints").is_dir():
            latest = CheckpointManager(run, keep_last=None).latest()
            if latest is None:
                raise FileNotFoundError(f"{str(p)!r} holds no complete, intact checkpoint")
            step = latest
    if (step / "actor").is_dir():
        if (step / MANIFEST).is_file():
            problems = damage(step)
            if problems:
                raise ValueError(f"checkpoint {str(step)!r} is damaged: {'; '.join(problems)}")
        hf = step / "actor" / "hf"
        if not (hf / "config.json").is_file():
            raise FileNotFoundError(f"checkpoint {str(step)!r} has no model export in actor/hf")
        return hf
    return p  # check_checkpoint_dir names what is missing


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail early, naming the directory and the missing file, instead of deep inside transformers."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        missing.append("model weights (*.safetensors)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        missing.append("tokenizer.json / tokenizer_config.json")
    if missing:
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} is missing: {', '.join(missing)}")
    return path


def read_config_json(path: str | Path) -> dict:
    """config.json of a model folder as a dict; a clear error for a file that is not JSON."""
    config = Path(path) / "config.json"
    try:
        d = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{config}: expected a JSON object, got {type(d).__name__}")
    return d


def model_classes(config: dict) -> tuple[type, type]:
    """(config class, model class) for a config.json dict: LLaDA-V for model_type "llava_llada", and for a
    "llada" config carrying LLaVA's mm_vision_tower or naming LlavaLLaDAModelLM (checkpoints fine-tuned from
    LLaDA-V through LLaDA's remote code save model_type "llada"); LLaDA otherwise."""
    llava = (config.get("model_type") == "llava_llada" or "mm_vision_tower" in config
             or "LlavaLLaDAModelLM" in (config.get("architectures") or []))
    return (LLaDAVConfig, LLaDAVModelLM) if llava else (LLaDAConfig, LLaDAModelLM)


def load_config(path: str | Path, **overrides):
    """The model config of a folder, config.json's values with `overrides` on top (e.g. LLaDA-V's
    image_aspect_ratio="pad"), validated by its class; errors name config.json."""
    path = Path(path)
    d = read_config_json(path)
    config_class, _ = model_classes(d)
    try:
        return config_class(**{**d, **overrides})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None


def check_model_files(path: str | Path, **config_overrides) -> Path:
    """check_checkpoint_dir, plus what would otherwise fail deep inside an actor: config.json must
    parse and describe a valid LLaDAConfig (positive sizes, heads dividing d_model, ..., and only the
    LLaDA settings this model computes: block_type llama, rms norms, RoPE, no dropout, ...) or, for a LLaDA-V
    folder, a valid LLaDAVConfig (with `config_overrides` applied, as load_model would), and every
    *.safetensors file's header must parse with each tensor's bytes inside the file. Reads only
    config.json and the headers (kilobytes, even for an 8B checkpoint), never a tensor."""
    path = check_checkpoint_dir(path)
    load_config(path, **config_overrides)
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors_header(file)
    return path


def check_safetensors_header(file: Path) -> None:
    """The safetensors layout: an 8-byte little-endian header length N, N bytes of JSON mapping each
    tensor to its data_offsets [begin, end) within the data that follows; a truncated file cuts them."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or 8 + n > size:
            raise ValueError(f"{file}: truncated or not a safetensors file ({size} bytes, header claims "
                             f"{'?' if n is None else 8 + n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: unreadable safetensors header ({e})") from None
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1)) if isinstance(info, dict) else (0, -1)
        if not 0 <= begin <= end <= data:
            raise ValueError(f"{file}: tensor {name!r} lies at bytes {begin}..{end} of the data, but the file "
                             f"holds {data} (truncated?)")


def load_model(path: str | Path, dtype=None, **config_overrides) -> LLaDAModelLM | LLaDAVModelLM:
    """The model of a checkpoint folder, its class picked by config.json (model_classes). `config_overrides`
    replace config.json values before the config is validated (LLaDA-V: image_aspect_ratio="pad" loads
    GSAI-ML/LLaDA-V, whose "anyres_max_4" is refused). Every tensor must be in the files, and no other."""
    path = check_checkpoint_dir(path)
    config_class, model_class = model_classes(read_config_json(path))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if config_overrides or model_class is LLaDAVModelLM:
        try:
            kwargs["config"] = config_class.from_pretrained(path, **config_overrides)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
    model, info = model_class.from_pretrained(path, output_loading_info=True, **kwargs)
    # from_pretrained fills a missing tensor with fresh random values and drops an unknown one, with a
    # log line at most: either would train or export another model than the checkpoint holds.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            names = sorted(map(str, info[kind]))
            family = "LLaDA-V" if model_class is LLaDAVModelLM else "LLaDA"
            raise ValueError(f"{str(path)!r}: not a {family} checkpoint this model loads whole; "
                             f"{kind.replace('_', ' ')}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    if isinstance(model, LLaDAVModelLM):
        model.freeze_vision_tower()  # loading may hand back fresh Parameters
    return model


def vision_input_size(path: str | Path) -> int | None:
    """The image size a model folder's vision tower takes (LLaDA-V), or None for a model without one.
    Reads config.json only."""
    try:
        raw = read_config_json(path)
    except (OSError, ValueError):
        return None  # check_model_files names the problem
    config_class, _ = model_classes(raw)
    if config_class is not LLaDAVConfig:
        return None
    # The input size does not depend on the aspect-ratio handling, which check_model_files judges.
    return config_class.from_dict(raw, image_aspect_ratio="square").image_size


def load_tokenizer(path: str | Path):
    tok = AutoTokenizer.from_pretrained(check_checkpoint_dir(path))
    if tok.mask_token_id is None:
        raise ValueError(f"tokenizer in {str(path)!r} has no mask token (expected e.g. '<|mdm_mask|>')")
    tok.padding_side = "left"
    return tok


def load_checkpoint(path: str | Path, dtype=None, **config_overrides):
    """(model, tokenizer) from a local directory: the tiny shipped one or a real LLaDA / LLaDA-V checkpoint."""
    model, tok = load_model(path, dtype, **config_overrides), load_tokenizer(path)
    if model.config.mask_token_id != tok.mask_token_id:
        raise ValueError(
            f"checkpoint {str(path)!r}: config.json mask_token_id={model.config.mask_token_id} but the tokenizer's "
            f"mask token has id {tok.mask_token_id}"
        )
    check_image_vocab(model.config, tok, f"checkpoint {str(path)!r}")
    return model, tok
