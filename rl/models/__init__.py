"""Models: the LLaDA-architecture diffusion LM, its tokenizer, and checkpoint loading."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from .llada import LLaDAConfig, LLaDAModelLM
from .tokenizer import check_image_vocab

# The Auto classes LLaDA-8B's config.json maps to its LLaDAModelLM (auto_map: AutoConfig, AutoModel,
# AutoModelForCausalLM), so code written for LLaDA loads this one after `import rl.models`, with no
# trust_remote_code. (Despite the class name, LLaDA's forward is bidirectional, as this one is.)
AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForCausalLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "tiny-llada"


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


def check_model_files(path: str | Path) -> Path:
    """check_checkpoint_dir, plus what would otherwise fail deep inside an actor: config.json must
    parse and describe a valid LLaDAConfig (positive sizes, heads dividing d_model, ..., and only the
    LLaDA settings this model computes: block_type llama, rms norms, RoPE, no dropout, ...), and every
    *.safetensors file's header must parse with each tensor's bytes inside the file. Reads only
    config.json and the headers (kilobytes, even for an 8B checkpoint), never a tensor."""
    path = check_checkpoint_dir(path)
    config = path / "config.json"
    try:
        LLaDAConfig(**json.loads(config.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not valid JSON ({e})") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config}: {e}") from None
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


def load_model(path: str | Path, dtype=None) -> LLaDAModelLM:
    path = check_checkpoint_dir(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model, info = LLaDAModelLM.from_pretrained(path, output_loading_info=True, **kwargs)
    # from_pretrained fills a missing tensor with fresh random values and drops an unknown one, with a
    # log line at most: either would train or export another model than the checkpoint holds.
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            names = sorted(map(str, info[kind]))
            raise ValueError(f"{str(path)!r}: not a LLaDA checkpoint this model loads whole; "
                             f"{kind.replace('_', ' ')}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}")
    return model


def vision_input_size(path: str | Path) -> int | None:
    """The image size a model folder's vision tower takes (LLaDA-V), or None for a model without one.
    Reads config.json only."""
    config = Path(path) / "config.json"
    try:
        raw = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # check_model_files names the problem
    if raw.get("model_type") != "llava_llada":
        return None
    from .llada_v import LLaDAVConfig

    return LLaDAVConfig(**raw).image_size


def load_tokenizer(path: str | Path):
    tok = AutoTokenizer.from_pretrained(check_checkpoint_dir(path))
    if tok.mask_token_id is None:
        raise ValueError(f"tokenizer in {str(path)!r} has no mask token (expected e.g. '<|mdm_mask|>')")
    tok.padding_side = "left"
    return tok


def load_checkpoint(path: str | Path, dtype=None):
    """(model, tokenizer) from a local directory: the tiny shipped one or a real LLaDA checkpoint."""
    model, tok = load_model(path, dtype), load_tokenizer(path)
    if model.config.mask_token_id != tok.mask_token_id:
        raise ValueError(
            f"checkpoint {str(path)!r}: config.json mask_token_id={model.config.mask_token_id} but the tokenizer's "
            f"mask token has id {tok.mask_token_id}"
        )
    check_image_vocab(model.config, tok, f"checkpoint {str(path)!r}")
    return model, tok
