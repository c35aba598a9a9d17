"""python -m rl.export CHECKPOINT OUT_DIR [--max-shard-size 2GB] [--dtype float32|bfloat16] [--force]

Writes the policy of a training checkpoint (or any model folder this project loads) as a plain Hugging
Face folder: config.json with every LLaDA field, safetensors weights (LoRA already merged: the learner
saves merged weights in actor/hf), split into shards with model.safetensors.index.json above
--max-shard-size, the tokenizer with its chat template, and generation_config.json when the source has
one. CHECKPOINT is anything model.path accepts (rl.models.resolve_model_dir): global_step_N, its actor/,
a run's checkpoints/ (the newest intact step), the run folder, or a model folder.

The folder is written as OUT_DIR.tmp and renamed to OUT_DIR only once complete, so a crash never leaves
a partial export under the final name. A non-empty OUT_DIR is refused unless --force replaces it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from rl.errors import fsync_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _source(checkpoint: str | Path) -> Path:
    from rl.models import check_model_files, resolve_model_dir

    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        # The learner never writes one (actor/hf holds merged weights); a bare adapter has no base to merge into.
        raise ValueError(f"{str(path)!r} holds a LoRA adapter (adapter_config.json), not a model: export the "
                         "training checkpoint (global_step_N), whose actor/hf has the adapter merged in")
    return check_model_files(resolve_model_dir(path))


def _load(src: Path, dtype: torch.dtype | None):
    from transformers import AutoTokenizer

    from rl.models import load_model

    model = load_model(src, dtype or "auto")  # refuses a checkpoint with missing or unknown tensors
    # The tokenizer as stored (load_tokenizer would switch it to left padding for sampling).
    tok = AutoTokenizer.from_pretrained(src)
    if tok.mask_token_id != model.config.mask_token_id:
        raise ValueError(f"{str(src)!r}: config.json mask_token_id={model.config.mask_token_id} but the "
                         f"tokenizer's mask token has id {tok.mask_token_id}")
    return model, tok


def _check_out(out: Path, src: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"OUT_DIR {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"OUT_DIR {str(out)!r} is not empty (--force replaces it)")
    real_out, real_src = out.resolve(), src.resolve()
    if real_out == real_src or real_out in real_src.parents:
        # --force would delete the checkpoint being exported
        raise ValueError(f"OUT_DIR {str(out)!r} holds the checkpoint {str(src)!r}: choose another folder")


def _fsync_tree(path: Path) -> None:
    # The rename below must not become durable before the files it publishes.
    for file in path.iterdir():
        if not file.is_file():
            continue
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(path)


def export(checkpoint: str | Path, out_dir: str | Path, max_shard_size: str | int = "2GB",
           dtype: str | None = None, force: bool = False) -> Path:
    """Write the model behind `checkpoint` to `out_dir` (see the module docstring); returns out_dir."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = _source(checkpoint)
    out = Path(out_dir).expanduser()
    _check_out(out, src, force)
    model, tok = _load(src, DTYPES.get(dtype))

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an export that crashed; never a finished one
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    tok.save_pretrained(tmp)
    if (src / "generation_config.json").is_file():
        shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
    _fsync_tree(tmp)

    old = out.with_name(out.name + ".old")
    if out.exists():  # empty, or --force
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    fsync_dir(out.parent)
    if old.exists():
        shutil.rmtree(old)
    return out


def _summary(out: Path) -> str:
    index = out / "model.safetensors.index.json"
    shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1
    return f"wrote {out} ({shards} safetensors shard{'s' * (shards > 1)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rl.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="training checkpoint (global_step_N, a run, ...) or model folder")
    ap.add_argument("out_dir", help="folder to write; must be empty or absent unless --force")
    ap.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="weights' dtype in the export (default: as stored in the checkpoint)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty OUT_DIR")
    args = ap.parse_args(argv)
    from transformers.utils import logging as hf_logging

    # export() names a bad checkpoint in one line; transformers' load report and progress bars around it
    # would bury that line. Restored after, for a caller that runs main() in its own process.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        out = export(args.checkpoint, args.out_dir, args.max_shard_size, args.dtype, args.force)
    except (OSError, ValueError) as e:
        print(f"rl.export: error: {e}", file=sys.stderr)
        return 2
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    print(_summary(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
