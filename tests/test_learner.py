import json
import os
import socket
from dataclasses import replace

import deepspeed
import pytest
import torch
import torch.multiprocessing as mp

from rl.advantages import group_advantages
from rl.batch import RolloutBatch
from rl.estimators import MaskPlan, token_logps
from rl.learner import Learner
from rl.models import load_checkpoint, load_model
from rl.models.llada import LLaDAModelLM

# Learner exports MASTER_ADDR/RANK/... for DeepSpeed (tests/conftest.py: restore_env).
pytestmark = pytest.mark.usefixtures("restore_env")

torch.set_num_threads(1)

OPTIM = {"lr": 1e-2, "max_grad_norm": 1.0}
UNIGRPO = {"name": "unigrpo", "mu": 2, "beta": 0.04}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_batch(inf_in_first_group: bool = False) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    B, G, P, L = 8, 4, 4, 6
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    adv = group_advantages(rewards, G)
    if inf_in_first_group:
        adv[0] = float("inf")
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[::2, 0] = 0
    answer_mask = torch.ones(B, L)
    answer_mask[1, 4:] = 0
    return RolloutBatch(prompt_ids=torch.randint(10, 200, (B, P), generator=g), prompt_mask=prompt_mask,
                        answer_ids=torch.randint(10, 200, (B, L), generator=g), answer_mask=answer_mask,
                        advantages=adv, rewards=rewards, group_size=G)


def learner(ckpt, zero_stage=0, algorithm=UNIGRPO, **kw) -> Learner:
    return Learner(ckpt, algorithm, OPTIM, zero_stage, rank=0, world_size=1, master_port=free_port(), **kw)


def answer_logps(model, batch: RolloutBatch, mask_id: int) -> torch.Tensor:
    """Per-row mean log-prob of the answer with the whole answer masked: a fixed, noise-free probe."""
    answer = (batch.answer_mask > 0)[None]
    noise = torch.cat([torch.zeros_like(batch.prompt_ids, dtype=torch.bool)[None], torch.ones_like(answer)], -1)
    with torch.no_grad():
        lp = token_logps(model, batch, MaskPlan(noise, answer), mask_id, entropy=False).logp[0]
    return lp.sum(-1) / answer[0].sum(-1)


def weights(learner: Learner) -> dict:
    return learner.state_dict_for_rollout()


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_zero0_update_learns_and_reports_metrics(ckpt):
    batch = make_batch()
    lrn = learner(ckpt)
    try:
        assert lrn.ref is not None and not any(p.requires_grad for p in lrn.ref.parameters())
        # gloo reduces on the CPU; DeepSpeed's shared-memory op (a minute-long JIT build) stays unbuilt.
        assert deepspeed.comm.comm.cdb.shm_comm_op is None
        ref_before = {k: v.clone() for k, v in lrn.ref.state_dict().items()}
        w0 = weights(lrn)
        before = answer_logps(lrn.module, batch, lrn.mask_id)
        for seed in range(4):
            m = lrn.update(batch, seed)
            assert set(m) == {"pg_loss", "pg_clipfrac", "ppo_kl", "kl_loss", "entropy", "grad_norm",
                              "skipped_steps", "lr"}
            assert all(torch.isfinite(torch.tensor(v)) for v in m.values()) and m["skipped_steps"] == 0
        assert m["lr"] == OPTIM["lr"] and m["kl_loss"] > 0
        w1 = weights(lrn)
        assert any(not torch.equal(w0[k], w1[k]) for k in w0)
        assert_same(ref_before, lrn.ref.state_dict())
        gain = answer_logps(lrn.module, batch, lrn.mask_id) - before
        pos = batch.advantages > 0
        # Answers that beat their group become likelier, and more so than those that lost.
        assert (gain[pos] > 0).all() and gain[pos].mean() > gain[~pos].mean()
    finally:
        lrn.close()


def test_nonfinite_grad_norm_skips_step_zero0(ckpt):
    lrn = learner(ckpt, algorithm={"name": "unigrpo", "mu": 1, "beta": 0.0})
    try:
        assert lrn.ref is None  # beta = 0: no reference is loaded
        w0 = weights(lrn)
        m = lrn.update(make_batch(inf_in_first_group=True), seed=0)
        assert m["skipped_steps"] == 1 and not torch.isfinite(torch.tensor(m["grad_norm"]))
        assert_same(w0, weights(lrn))
        assert lrn.update(make_batch(), seed=0)["skipped_steps"] == 0
        assert any(not torch.equal(w0[k], v) for k, v in weights(lrn).items())
    finally:
        lrn.close()


def test_lora_reference_is_the_base_model_and_rollout_weights_are_merged(ckpt):
    batch = make_batch()
    base = load_model(ckpt).eval()
    lrn = learner(ckpt, lora={"r": 4, "alpha": 8})
    try:
        assert lrn.peft_model.peft_config["default"].lora_alpha == 8  # "alpha" is the recipes' name for it
        names = [n for n, p in lrn.engine.module.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n for n in names)
        assert not any("transformer.ff_out.lora" in n for n in names)  # the LM head gets no adapter
        mask = lrn.mask_id
        base_lp = answer_logps(base, batch, mask)
        torch.testing.assert_close(answer_logps(lrn.engine, batch, mask), base_lp, rtol=0, atol=0)
        lrn.update(batch, seed=0)
        assert not torch.allclose(answer_logps(lrn.engine, batch, mask), base_lp)
        torch.testing.assert_close(answer_logps(lrn.ref, batch, mask), base_lp, rtol=0, atol=0)

        sd = weights(lrn)
        assert sd.keys() == base.state_dict().keys()
        merged = LLaDAModelLM(base.config)
        merged.load_state_dict(sd, strict=True)
        torch.testing.assert_close(answer_logps(merged, batch, mask), answer_logps(lrn.engine, batch, mask))
        q = "model.transformer.blocks.0.q_proj.weight"
        assert not torch.equal(sd[q], base.state_dict()[q])  # adapters are merged in
        norm = "model.transformer.ln_f.weight"
        assert torch.equal(sd[norm], base.state_dict()[norm])  # frozen weights are untouched
    finally:
        lrn.close()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_save_load_resumes_exactly(ckpt, tmp_path, zero_stage):
    batch = make_batch()
    a = learner(ckpt, zero_stage)
    try:
        for seed in (1, 2):
            a.update(batch, seed)
        a.save(tmp_path / "ckpt")
        saved = weights(a)
        for seed in (3, 4):
            a.update(batch, seed)
        expected = weights(a)
    finally:
        a.close()
    b = learner(ckpt, zero_stage)
    try:
        b.load(tmp_path / "ckpt")
        assert_same(saved, weights(b))
        for seed in (3, 4):
            b.update(batch, seed)
        assert_same(expected, weights(b))
    finally:
        b.close()
    exported, _ = load_checkpoint(tmp_path / "ckpt" / "hf")
    assert_same(saved, exported.state_dict())


def test_bit_flip_in_a_saved_learner_checkpoint_falls_back_to_the_older_one(ckpt, tmp_path):
    from rl.checkpoint import CheckpointManager, resolve_resume

    mgr = CheckpointManager(tmp_path, keep_last=None)
    a = learner(ckpt)
    try:
        for step in (1, 2):
            a.update(make_batch(), step)
            mgr.save(step, lambda path: a.save(path / "actor"), {})
    finally:
        a.close()
    # One byte in the middle of the largest file (DeepSpeed's model or optimizer states): a weight of
    # 2.6e13 resumed silently before checkpoints carried a manifest.
    files = [p for p in mgr.step_dir(2).rglob("*") if p.is_file()]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x40
    largest.write_bytes(bytes(data))
    name = largest.relative_to(mgr.step_dir(2)).as_posix()
    with pytest.warns(UserWarning, match=rf"global_step_2 is damaged: {name} does not match.*global_step_1 instead"):
        assert resolve_resume("auto", tmp_path) == mgr.step_dir(1)


@pytest.mark.parametrize("change,message", [
    # The same checks rl.config.validate runs on trainer.optim (rl.config.OptimConfig)...
    (dict(optim={"lr": 0.0}), r"trainer.optim.lr=0.0: expected a number > 0"),
    (dict(optim={"lr": "abc"}), r"trainer.optim.lr: Value 'abc'"),
    (dict(optim={"lr": 1e-3, "betas": (0.9, 1.5)}), r"trainer.optim.betas=\[0.9, 1.5\]"),
    (dict(optim={"lr": 1e-3, "max_grad_norm": -1}), r"trainer.optim.max_grad_norm=-1.0"),
    (dict(optim={"lr": 1e-3, "learning_rate": 1}), r"trainer.optim: unknown key\(s\) \['learning_rate'\]; known keys"),
    # ... the estimator's own, and those of a direct caller's arguments.
    (dict(algorithm={"name": "ppo"}), "estimator"),
    (dict(algorithm={"name": "unigrpo", "eps": -1}), "eps"),
    (dict(lora={"r": 0}), "model.lora.r=0"),
    (dict(lora={"rank": 4}), "model.lora"),
    (dict(lora={"alpha": 4, "lora_alpha": 8}), "model.lora.alpha"),
    (dict(rank=2), "rank=2"),
    (dict(world_size=0), "world_size=0"),
    (dict(bf16=True), "bf16=True"),
])
def test_bad_config_is_named(change, message):
    kw = dict(model_path="/nonexistent", algorithm=UNIGRPO, optim=OPTIM, zero_stage=0, rank=0, world_size=1,
              master_port=free_port())
    with pytest.raises(ValueError, match=message):
        Learner(**{**kw, **change})


LORA = {"r": 4, "lora_alpha": 8}
TWO_RANK_RUNS = {"zero0": (0, None), "zero3": (3, None), "zero0_lora": (0, LORA), "zero3_lora": (3, LORA)}


def _two_rank_worker(rank, ckpt, ports, out):
    torch.set_num_threads(1)
    batch, bad = make_batch(), make_batch(inf_in_first_group=True)  # the inf is in rank 0's groups only
    results = {}
    for (name, (stage, lora)), port in zip(TWO_RANK_RUNS.items(), ports):
        # A fresh port per group: a rank that re-creates a group on the old port can reach the old
        # store before its peer has torn it down.
        lrn = Learner(ckpt, UNIGRPO, OPTIM, stage, rank=rank, world_size=2, master_port=port, lora=lora)
        before = lrn.state_dict_for_rollout()
        skip = lrn.update(bad, seed=0)
        after_skip = lrn.state_dict_for_rollout()
        m = lrn.update(batch, seed=0)
        sd = lrn.state_dict_for_rollout()
        r = results[name] = {"metrics": m, "skip": skip, "none_on_rank1": sd is None}
        try:
            lrn.shard(replace(batch, group_size=8))  # one group cannot be split over two ranks
        except ValueError as e:
            r["shard_error"] = str(e)
        if rank == 0:
            r["skip_kept_weights"] = all(torch.equal(before[k], after_skip[k]) for k in before)
            torch.save(sd, os.path.join(out, f"{name}.pt"))
        if stage == 3:
            # Every ZeRO-3 shard and its optimizer state round-trip through a checkpoint.
            lrn.save(os.path.join(out, name))
            lrn.update(batch, seed=1)
            first = lrn.state_dict_for_rollout()
            lrn.load(os.path.join(out, name))
            lrn.update(batch, seed=1)
            again = lrn.state_dict_for_rollout()
            if rank == 0:
                r["resumed_exactly"] = all(torch.equal(first[k], again[k]) for k in first)
        lrn.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_two_ranks_zero3_matches_zero0_and_skips_nonfinite_together(ckpt, tmp_path):
    mp.spawn(_two_rank_worker, args=(ckpt, [free_port() for _ in TWO_RANK_RUNS], str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    names = LLaDAModelLM(load_model(ckpt).config).state_dict()
    sd = {name: torch.load(tmp_path / f"{name}.pt") for name in TWO_RANK_RUNS}
    for name, (stage, _) in TWO_RANK_RUNS.items():
        assert r0[name]["metrics"] == r1[name]["metrics"]  # all-reduced
        # Only rank 0 saw the inf, yet both ranks skipped every inner step and kept their weights.
        assert r0[name]["skip"]["skipped_steps"] == r1[name]["skip"]["skipped_steps"] == UNIGRPO["mu"]
        assert r0[name]["skip_kept_weights"] and r1[name]["none_on_rank1"]
        assert r0[name]["metrics"]["skipped_steps"] == 0
        assert r0[name]["shard_error"].startswith("batch.groups=1: expected a multiple of world_size=2")
        if stage == 3:
            assert r0[name]["resumed_exactly"]
            assert_same(sd[name], load_model(tmp_path / name / "hf").state_dict())
        assert sd[name].keys() == names.keys()
        for k, v in names.items():
            assert sd[name][k].shape == v.shape and sd[name][k].dtype == torch.float32
    # Sharding changes only summation order: Adam's per-element normalisation can amplify that
    # rounding where a gradient is near zero, hence 1e-5 (a thousandth of one lr=1e-2 step).
    for zero3, zero0 in (("zero3", "zero0"), ("zero3_lora", "zero0_lora")):
        for k in names:
            torch.testing.assert_close(sd[zero3][k], sd[zero0][k], rtol=1e-4, atol=1e-5)
    merged = LLaDAModelLM(load_model(ckpt).config)
    merged.load_state_dict(sd["zero3_lora"], strict=True)
