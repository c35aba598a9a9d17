import ast
import json
import os
import random
from pathlib import Path

import pytest
import torch

import rl.checkpoint
from rl.checkpoint import COMPLETE, MANIFEST, RNG_FILE, STATE_FILE, TRACKER, CheckpointManager, resolve_resume
from rl.errors import ConfigError


def write_actor(path):
    (path / "actor").mkdir()
    (path / "actor" / "model.bin").write_bytes(b"weights")


def names(mgr):
    return sorted(p.name for p in mgr.dir.iterdir())


def test_layout_tracker_and_retention(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        out = mgr.save(step, write_actor, {"data_cursor": {"epoch": 0, "index": step * 8}, "history": [step]})
        assert out == tmp_path / "checkpoints" / f"global_step_{step}"
    assert names(mgr) == ["global_step_20", "global_step_30", TRACKER]
    assert (mgr.dir / TRACKER).read_text() == "30"
    assert mgr.latest() == mgr.step_dir(30)
    d = mgr.step_dir(30)
    assert {p.name for p in d.iterdir()} == {"actor", STATE_FILE, RNG_FILE, MANIFEST, COMPLETE}
    assert set(json.loads((d / MANIFEST).read_text())["files"]) == {"actor/model.bin", STATE_FILE, RNG_FILE}
    assert (d / "actor" / "model.bin").read_bytes() == b"weights"
    state = json.loads((d / STATE_FILE).read_text())
    assert state["step"] == 30 and state["data_cursor"] == {"epoch": 0, "index": 240} and state["history"] == [30]
    assert isinstance(state["wall_time"], float)


def test_keep_all_and_resave_of_existing_step(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, None, {"v": step})
    # Resumed from step 1 and saving step 2 again: the new copy replaces the old one; 3 is left alone.
    mgr.save(2, None, {"v": "again"})
    assert names(mgr) == ["global_step_1", "global_step_2", "global_step_3", TRACKER]
    assert json.loads((mgr.step_dir(2) / STATE_FILE).read_text())["v"] == "again"
    assert mgr.latest() == mgr.step_dir(2)


def test_retention_never_deletes_newer_timeline_or_tracked(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    for step in (5, 9):
        mgr.save(step, None, {})
    assert names(mgr) == ["global_step_9", TRACKER]
    mgr.save(6, None, {})  # resumed from an earlier checkpoint: step 9 is not "older", keep it
    assert names(mgr) == ["global_step_6", "global_step_9", TRACKER]
    assert (mgr.dir / TRACKER).read_text() == "6"


@pytest.mark.parametrize("crash_at", ["save_fn", "rename", "tracker"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, write_actor, {"data_cursor": 8})

    def save_fn(path):
        write_actor(path)
        if crash_at == "save_fn":
            raise RuntimeError("crash")

    real_replace = os.replace

    def replace(src, dst):
        if (crash_at, Path(src).name) in {("rename", "global_step_2.tmp"), ("tracker", TRACKER + ".tmp")}:
            raise RuntimeError("crash")
        real_replace(src, dst)

    monkeypatch.setattr(rl.checkpoint.os, "replace", replace)
    with pytest.raises(RuntimeError, match="crash"):
        mgr.save(2, save_fn, {"data_cursor": 16})
    monkeypatch.setattr(rl.checkpoint.os, "replace", real_replace)
    assert (mgr.dir / TRACKER).read_text() == "1"
    assert mgr.step_dir(2).exists() == (crash_at == "tracker")  # renamed only once complete
    assert mgr.latest() == mgr.step_dir(1)
    assert resolve_resume("auto", tmp_path) == mgr.step_dir(1)
    assert any(p.name.endswith(".tmp") for p in mgr.dir.iterdir())
    mgr.save(3, write_actor, {"data_cursor": 24})
    assert not any(p.name.endswith(".tmp") for p in mgr.dir.iterdir())
    assert mgr.latest() == mgr.step_dir(3)
    kept = ["global_step_2", "global_step_3"] if crash_at == "tracker" else ["global_step_1", "global_step_3"]
    assert names(mgr) == [*kept, TRACKER]


def test_tracker_lagging_behind_a_complete_dir_is_trusted(tmp_path):
    # Crash after the rename but before the tracker write: the tracker still names step 1.
    mgr = CheckpointManager(tmp_path, keep_last=None)
    mgr.save(1, None, {})
    mgr.save(2, None, {})
    (mgr.dir / TRACKER).write_text("1")
    assert mgr.latest() == mgr.step_dir(1)


def test_dangling_tracker_falls_back_with_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, None, {})
    (mgr.step_dir(3) / COMPLETE).unlink()
    with pytest.warns(UserWarning, match="global_step_3.*COMPLETE.*global_step_2"):
        assert mgr.latest() == mgr.step_dir(2)
    (mgr.dir / TRACKER).write_text("7")  # names a directory that does not exist at all
    with pytest.warns(UserWarning, match="global_step_7"):
        assert mgr.latest() == mgr.step_dir(2)
    (mgr.dir / TRACKER).unlink()
    with pytest.warns(UserWarning, match="missing or unreadable"):
        assert mgr.latest() == mgr.step_dir(2)


def write_big_actor(path):
    # A model-states file large enough that one flipped byte sits deep inside it, next to a small one.
    (path / "actor").mkdir()
    (path / "actor" / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1 << 20))
    (path / "actor" / "latest").write_text("learner")


def flip_middle_byte_of_largest(ckpt):
    f = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return f


def truncate_largest(ckpt):
    f = max((p for p in ckpt.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    return f


@pytest.mark.parametrize("spoil", [flip_middle_byte_of_largest, truncate_largest])
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, spoil):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    for step in (1, 2, 3):
        mgr.save(step, write_big_actor, {})
    spoil(mgr.step_dir(2))
    spoil(mgr.step_dir(3))
    with pytest.warns(UserWarning, match=r"global_step_3 is damaged: actor/mp_rank_00_model_states\.pt .*"
                                         r"global_step_2 is damaged.*resuming from .*global_step_1 instead"):
        assert resolve_resume("auto", tmp_path) == mgr.step_dir(1)
    # Named explicitly, a damaged checkpoint is an error, not a silent substitution.
    with pytest.raises(ConfigError, match=r"trainer.resume=.*global_step_3.*damaged: actor/mp_rank_00_model_states"):
        resolve_resume(str(mgr.step_dir(3)), tmp_path)


def test_missing_file_and_no_intact_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    mgr.save(1, write_big_actor, {})
    (mgr.step_dir(1) / "actor" / "latest").unlink()
    with pytest.warns(UserWarning, match=r"actor/latest is missing.*no intact checkpoint"):
        assert mgr.latest() is None


def test_checkpoint_without_manifest_is_accepted_with_a_warning(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=None)
    old = mgr.save(1, write_actor, {})
    (old / MANIFEST).unlink()  # as written before manifests existed
    with pytest.warns(UserWarning, match=f"global_step_1: no {MANIFEST}"):
        assert resolve_resume("auto", tmp_path) == old


def test_retention_keeps_the_intact_checkpoint_it_just_wrote(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, write_big_actor, {})
    flip_middle_byte_of_largest(mgr.step_dir(1))
    mgr.save(2, write_big_actor, {})
    assert names(mgr) == ["global_step_2", TRACKER] and mgr.latest() == mgr.step_dir(2)


def test_empty_run_dir(tmp_path):
    assert CheckpointManager(tmp_path).latest() is None
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume("disable", tmp_path) is None


def test_rng_round_trip(tmp_path):
    np = pytest.importorskip("numpy")
    mgr = CheckpointManager(tmp_path)
    gen = torch.Generator().manual_seed(123)

    def draw():
        return (random.random(), np.random.rand(), torch.rand(3).tolist(), torch.rand(2, generator=gen).tolist())

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    draw()
    path = mgr.save(1, None, {"step": 1}, generators={"plans": gen})
    first = [draw() for _ in range(3)]
    state = mgr.load(path, generators={"plans": gen})
    assert state["step"] == 1
    assert [draw() for _ in range(3)] == first
    # A fresh generator (as after a process restart) is restored in place too.
    fresh = torch.Generator()
    mgr.load(path, generators={"plans": fresh})
    assert torch.rand(2, generator=fresh).tolist() == first[0][3]
    with pytest.raises(KeyError, match=f"{RNG_FILE}.*'rollout'.*plans"):
        mgr.load(path, generators={"rollout": torch.Generator()})


def test_explicit_resume_path_errors_name_the_path(tmp_path):
    mgr = CheckpointManager(tmp_path)
    good = mgr.save(4, None, {})
    assert resolve_resume(str(good), tmp_path) == good
    with pytest.raises(ConfigError, match="trainer.resume=.*global_step_99.*directory itself"):
        resolve_resume(str(mgr.step_dir(99)), tmp_path)
    (good / RNG_FILE).unlink()
    with pytest.raises(ConfigError, match=f"global_step_4.*{RNG_FILE}"):
        resolve_resume(str(good), tmp_path)
    with pytest.raises(FileNotFoundError, match="global_step_4.*incomplete"):
        mgr.load(good)


def test_bad_inputs_fail_before_writing(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match="trainer_state\\['cursor'\\]"):
        mgr.save(1, None, {"cursor": object()})
    with pytest.raises(ValueError, match="disagrees"):
        mgr.save(1, None, {"step": 2})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=-1)
    assert not mgr.dir.exists() or not any(mgr.dir.iterdir())


def test_module_does_not_import_ray():
    # Static check: a subprocess import would cost seconds of torch start-up on a shared machine.
    tree = ast.parse(Path(rl.checkpoint.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "ray" not in imported and "torch" in imported


def test_a_training_checkpoint_is_a_model_path(tmp_path):
    import shutil

    from rl.models import TINY_CHECKPOINT, resolve_model_dir

    mgr = CheckpointManager(tmp_path / "run", keep_last=None)
    for step in (2, 4):
        mgr.save(step, lambda p: shutil.copytree(TINY_CHECKPOINT, p / "actor" / "hf"), {})
    newest = tmp_path / "run" / "checkpoints" / "global_step_4"
    assert resolve_model_dir(TINY_CHECKPOINT) == TINY_CHECKPOINT
    for given in (newest, newest / "actor", tmp_path / "run", tmp_path / "run" / "checkpoints"):
        assert resolve_model_dir(given) == newest / "actor" / "hf"
    weights = newest / "actor" / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="damaged.*model.safetensors"):
        resolve_model_dir(newest)
    older = tmp_path / "run" / "checkpoints" / "global_step_2"
    with pytest.warns(UserWarning, match="global_step_4 is damaged"):  # the run falls back to step 2
        assert resolve_model_dir(tmp_path / "run") == older / "actor" / "hf"
