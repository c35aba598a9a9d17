"""Checkpoint bookkeeping for a run directory: layout, driver state, RNG, tracker, retention, resume.

Layout (verl's names):

    <run_dir>/checkpoints/
        latest_checkpointed_iteration.txt    "N": the newest checkpoint resume may trust
        global_step_N/
            ...                              whatever save_fn wrote (e.g. actor/ from DeepSpeed)
            trainer_state.json               {"step": N, "wall_time": ..., **trainer_state}
            rng_state.pt                     python, numpy, torch CPU/CUDA and named generator states
            MANIFEST.json                    size and sha256 of every file above, checked on resume
            COMPLETE                         written last, before the directory gets its final name

A step is written into global_step_N.tmp/ and renamed only once complete; the tracker is replaced
after the rename. A crash therefore leaves either a *.tmp directory (removed by the next save) or a
complete global_step_N that the tracker may not name yet; resume follows the tracker, so it always
lands on a complete checkpoint. Resume also re-hashes the files against MANIFEST.json: a damaged
newest checkpoint (bit flip, truncated or missing file) is skipped with a warning naming the file, in
favour of the newest intact one; a damaged checkpoint named explicitly is an error. A checkpoint
written before manifests existed is accepted with a warning (nothing to check it against).
save_fn runs on the driver: with several nodes, run_dir must be on a file system every learner can
write to.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from rl.errors import ConfigError, fail, fsync_dir, write_atomic

TRACKER = "latest_checkpointed_iteration.txt"
STATE_FILE = "trainer_state.json"
RNG_FILE = "rng_state.pt"
COMPLETE = "COMPLETE"
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"global_step_(\d+)")


def _sha256(path: Path) -> str:
    # sha256 runs at ~650 MB/s per core here (hashlib.file_digest; 0.45 s for a 300 MB file, blake2b
    # and md5 are no faster), and hashlib releases the GIL, so files are hashed in parallel threads.
    # An 8B model's checkpoint with its optimizer states is ~100 GB: ~2.5 min of one core on every
    # save and again on resume, about what reading it from disk costs anyway.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _hash_all(root: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(root / n), names)))


def write_manifest(path: Path) -> None:
    """MANIFEST.json: relative path -> size and sha256 of every file under `path` (but itself and COMPLETE)."""
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.is_file() and p.name not in (MANIFEST, COMPLETE))
    digests = _hash_all(path, names)
    files = {n: {"size": (path / n).stat().st_size, "sha256": digests[n]} for n in names}
    write_atomic(path / MANIFEST, json.dumps({"files": files}, indent=1).encode())


def damage(path: str | os.PathLike) -> list[str]:
    """What is wrong with the files of checkpoint `path` against its MANIFEST.json (empty = intact).

    Sizes are compared first, so a missing or truncated file is found without hashing anything. A
    checkpoint without a manifest (written before manifests existed) is accepted with a warning."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        warnings.warn(f"{path}: no {MANIFEST} (written by an older version); its files cannot be verified")
        return []
    except (ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST} unreadable ({e})"]
    problems = []
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != want["size"]:
            problems.append(f"{name} has {file.stat().st_size} bytes, {want['size']} were written")
    if problems:
        return problems
    digests = _hash_all(path, list(files))
    return [f"{name} does not match its sha256 (corrupted)" for name, want in files.items()
            if digests[name] != want["sha256"]]


def missing_parts(path: str | os.PathLike) -> list[str]:
    """What a checkpoint directory lacks to be complete (empty when it is complete)."""
    path = Path(path)
    if not path.is_dir():
        return ["the directory itself"]
    return [name for name in (STATE_FILE, RNG_FILE, COMPLETE) if not (path / name).is_file()]


def _rng_snapshot(generators: dict[str, torch.Generator] | None) -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # Plain ints keep the file loadable with torch.load(weights_only=True).
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    return state


def _rng_restore(file: Path, state: dict, generators: dict[str, torch.Generator] | None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            warnings.warn(f"{file}: holds a numpy RNG state but numpy is not installed; not restored")
        else:
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn(f"{file}: CUDA RNG states for {len(state['cuda'])} device(s) not restored "
                          f"(this process sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    saved = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved:
            raise KeyError(f"{file}: no state for generator {name!r}; it holds {sorted(saved)}")
        gen.set_state(saved[name])


class CheckpointManager:
    """Saves global_step_N checkpoints under <run_dir>/checkpoints and finds the one to resume from."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int | None = 3):
        if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 0):
            fail("keep_last", keep_last, "expected None or an integer >= 0 (0 = keep all)")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last or None

    def step_dir(self, step: int) -> Path:
        return self.dir / f"global_step_{step}"

    def save(self, step: int, save_fn: Callable[[Path], None] | None, trainer_state: dict,
             generators: dict[str, torch.Generator] | None = None) -> Path:
        """Write checkpoint `step` and point the tracker at it; returns its final directory.

        save_fn(path) writes the model/optimizer inside `path`, a temporary directory renamed once the
        step is complete, so it must not record `path` anywhere (relative names inside are fine).
        """
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        if trainer_state.get("step", step) != step:
            raise ValueError(f"trainer_state['step'] = {trainer_state['step']!r} disagrees with step = {step}")
        # Serialise before touching the disk so a bad value costs nothing.
        for key, value in trainer_state.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as e:
                raise TypeError(f"trainer_state[{key!r}] is not JSON-serialisable for {STATE_FILE}: {e}") from e
        state_json = json.dumps({"step": step, "wall_time": time.time(), **trainer_state}, indent=1)

        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob("global_step_*.tmp"):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        final = self.step_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        tmp.mkdir()
        if save_fn is not None:
            save_fn(tmp)
        write_atomic(tmp / STATE_FILE, state_json.encode())
        buf = io.BytesIO()
        torch.save(_rng_snapshot(generators), buf)
        write_atomic(tmp / RNG_FILE, buf.getvalue())
        write_manifest(tmp)  # everything above, before COMPLETE: a complete checkpoint always has one
        write_atomic(tmp / COMPLETE, b"")

        # Re-saving an existing step (resumed from an earlier one): its old copy steps aside, and is
        # only deleted once the new one is in place and tracked.
        replaced = final.with_name(final.name + ".replaced.tmp")
        if final.exists():
            os.replace(final, replaced)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        write_atomic(self.dir / TRACKER, str(step).encode())
        if replaced.exists():
            shutil.rmtree(replaced)
        self._retain(step)
        return final

    def _complete_steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
        return sorted(s for s in steps if not missing_parts(self.step_dir(s)))

    def _tracked_step(self) -> int | None:
        path = self.dir / TRACKER
        if not path.is_file():
            return None
        text = path.read_text().strip()
        if not text.isdigit():
            warnings.warn(f"{path}: expected a step number, found {text!r}")
            return None
        return int(text)

    def _retain(self, step: int) -> None:
        # Steps after `step` belong to an abandoned timeline (resumed from earlier): left untouched
        # until a save overwrites them, since deleting them could lose the only copy of that work.
        # The step just saved is always kept, and its manifest was computed from the files as written,
        # so retention never removes the last intact checkpoint.
        if self.keep_last is None:
            return
        tracked = self._tracked_step()
        for old in [s for s in self._complete_steps() if s <= step][:-self.keep_last]:
            if old != tracked:
                # Renamed first so a crash mid-delete leaves a *.tmp, never a gutted "complete" dir.
                doomed = self.step_dir(old).with_name(f"global_step_{old}.deleting.tmp")
                os.replace(self.step_dir(old), doomed)
                shutil.rmtree(doomed)

    def latest(self) -> Path | None:
        """The checkpoint to resume from: the one the tracker names if it is complete and intact, else
        the newest complete and intact one at or before it, with one warning saying what was skipped."""
        tracked = self._tracked_step()
        complete = self._complete_steps()
        skipped = []
        if tracked is None:
            if complete:
                skipped.append(f"{self.dir / TRACKER} is missing or unreadable")
        else:
            complete = [s for s in complete if s <= tracked] or complete
            if tracked not in complete:
                skipped.append(f"{self.dir / TRACKER} names {self.step_dir(tracked)}, which lacks "
                               f"{', '.join(missing_parts(self.step_dir(tracked)))}")
        for step in reversed(complete):
            problems = damage(self.step_dir(step))
            if not problems:
                if skipped:
                    warnings.warn(f"{'; '.join(skipped)}; resuming from {self.step_dir(step)} instead")
                return self.step_dir(step)
            skipped.append(f"{self.step_dir(step)} is damaged: {'; '.join(problems)}")
        if skipped:
            warnings.warn(f"{'; '.join(skipped)}; no intact checkpoint to resume from")
        return None

    def load(self, path: str | os.PathLike, generators: dict[str, torch.Generator] | None = None) -> dict:
        """Restore the RNG states saved at `path` (generators in place) and return its trainer state."""
        path = Path(path)
        missing = missing_parts(path)
        if missing:
            raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path / STATE_FILE}: not valid JSON: {e}") from e
        _rng_restore(path / RNG_FILE, torch.load(path / RNG_FILE, weights_only=True), generators)
        return state


def resolve_resume(resume: str | os.PathLike | None, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: None/"disable" = fresh, "auto" = latest in run_dir if any, else a path."""
    if resume is None or resume in ("", "disable"):
        return None
    if resume == "auto":
        return CheckpointManager(run_dir, keep_last=None).latest()
    path = Path(resume)
    missing = missing_parts(path)
    if missing:
        fail("trainer.resume", str(resume), f"not a complete checkpoint (missing {', '.join(missing)}); expected a "
             ".../checkpoints/global_step_N directory, 'auto' or 'disable'", ConfigError)
    problems = damage(path)
    if problems:  # named explicitly: falling back to another one would resume something the user did not ask for
        fail("trainer.resume", str(resume), f"checkpoint is damaged: {'; '.join(problems)}", ConfigError)
    return path
