"""Models: the LLaDA-architecture diffusion LM, its tokenizer, and checkpoint loading."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .llada import LLaDAConfig, LLaDAModelLM

AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

TINY_CHECKPOINT = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "tiny-llada"


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


def load_model(path: str | Path, dtype=None) -> LLaDAModelLM:
    path = check_checkpoint_dir(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return LLaDAModelLM.from_pretrained(path, **kwargs)


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
    return model, tok
