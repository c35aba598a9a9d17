"""Memory options (docs/MEMORY.md): gradient checkpointing, micro-batched learner passes, ZeRO-Offload,
bf16 and a CPU-held reference; each changes memory, never the gradient."""
import json
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from peft import get_peft_model

from rl.config import ConfigError, check_memory, validate
from rl.estimators import REGISTRY, Estimator, build_estimator
from rl.learner import Learner, _check_lora, _ds_config
from rl.models import load_model
from rl.update import loss_share, policy_update
from tests.conftest import compose_cfg
from tests.test_learner import OPTIM, free_port, make_batch

# Learner exports MASTER_ADDR/RANK/... for DeepSpeed (tests/conftest.py: restore_env).
pytestmark = pytest.mark.usefixtures("restore_env")

torch.set_num_threads(1)


LORA = {"r": 4, "lora_alpha": 8}
# Each estimator's defaults, except SPG's blocks, which must divide make_batch's answer length 6.
HYPER = {"spg": {"block_length": 3}}


def _estimator(name, mask_id):
    return build_estimator(name, **HYPER.get(name, {}), mask_id=mask_id)


def _count_block_calls(model):
    calls = []
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for block in base.model.transformer.blocks:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def _lora_grads(ckpt, name, checkpointing):
    torch.manual_seed(0)  # the same LoRA initialisation in both runs
    model = get_peft_model(load_model(ckpt), _check_lora(LORA)).train()
    if checkpointing:
        with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mask_id = model.config.mask_token_id
    est, batch = _estimator(name, mask_id), make_batch()
    plans = est.plan(batch, 2, torch.Generator().manual_seed(0))
    calls = _count_block_calls(model)
    with torch.no_grad():
        old = est.token_logps(model, batch, plans[1], mask_id) if est.needs_old else None
        with model.disable_adapter():
            ref = est.token_logps(model, batch, plans[1], mask_id) if est.needs_ref else None
    no_grad_calls = len(calls)
    loss, _ = est.loss(batch, plans[1], est.token_logps(model, batch, plans[1], mask_id), old, ref)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, no_grad_calls, len(calls) - no_grad_calls


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_gradient_checkpointing_gives_the_same_lora_gradients(ckpt, name):
    plain, plain_ng, plain_calls = _lora_grads(ckpt, name, checkpointing=False)
    ckpted, ckpt_ng, ckpt_calls = _lora_grads(ckpt, name, checkpointing=True)
    layers = load_model(ckpt).config.n_layers
    # no_grad passes run each block once; the grad pass recomputes every block once in backward.
    assert ckpt_ng == plain_ng and plain_calls == layers and ckpt_calls == 2 * layers
    assert plain.keys() == ckpted.keys() and all("lora_" in n for n in plain)
    for k in plain:
        torch.testing.assert_close(ckpted[k], plain[k], rtol=1e-6, atol=1e-7)
    assert any(float(g.abs().sum()) > 0 for g in plain.values())


def test_checkpointing_leaves_the_cached_sampling_path_alone(ckpt):
    model = load_model(ckpt).train()
    x = make_batch().input_ids
    with torch.no_grad():
        plain = model(input_ids=x, return_kv=True)
        model.activation_checkpointing_enable()
        calls = _count_block_calls(model)
        again = model(input_ids=x, return_kv=True)
        window = model(input_ids=x[:, 2:5], kv_cache=again.kv, cache_span=(2, 5))
    assert model.gradient_checkpointing and len(calls) == 2 * model.config.n_layers
    assert torch.equal(plain.logits, again.logits) and window.logits.shape[1] == 3
    for (k0, v0), (k1, v1) in zip(plain.kv, again.kv):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


# --- micro-batches ------------------------------------------------------------------------------

def _policy_update_grads(ckpt, name, micro_batch, aggregation=None, ref_device=None):
    """Gradient of one inner step through rl.update.policy_update in plain torch (no optimizer)."""
    model = load_model(ckpt).train()
    hyper = dict(HYPER.get(name, {}), **({"aggregation": aggregation} if aggregation else {}))
    est = build_estimator(name, **hyper, mask_id=model.config.mask_token_id)
    ref = load_model(ckpt).eval()
    with torch.no_grad():  # a reference that differs from the policy, so the KL term has a gradient
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    backwards = []

    def accumulate(loss):
        backwards.append(1)
        loss.backward()

    def step(loss):
        accumulate(loss)
        return {}

    metrics = policy_update(model, ref, est, make_batch(), 1, model.config.mask_token_id, step,
                            torch.Generator().manual_seed(0), micro_batch, accumulate, ref_device)
    return {n: p.grad for n, p in model.named_parameters()}, metrics, len(backwards)


@pytest.mark.parametrize("name,aggregation", [*((n, None) for n in sorted(REGISTRY)),
                                              ("unigrpo", "token_mean"), ("diffu_grpo", "seq_mean_token_mean")])
def test_micro_batch_chunks_add_up_to_the_one_pass_gradient(ckpt, name, aggregation):
    whole, m0, n0 = _policy_update_grads(ckpt, name, 0, aggregation)
    sizes = (4, 8) if name == "wd1" else (1, 3)  # wd1's chunks are whole groups of 4
    for micro_batch in sizes:
        grads, m, n = _policy_update_grads(ckpt, name, micro_batch, aggregation)
        assert n == -(-8 // micro_batch)
        for k in whole:
            torch.testing.assert_close(grads[k], whole[k], rtol=1e-5, atol=1e-6)
        for k in m0:
            assert m[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    assert n0 == 1


def test_reference_on_its_own_device_gives_the_same_gradient(ckpt):
    # On a CPU-only machine this runs the moves of trainer.ref_device=cpu (batch over, log-probs back)
    # from the CPU to the CPU: the path is the CUDA one, the result must not change.
    whole, m0, _ = _policy_update_grads(ckpt, "unigrpo", 0)
    for micro_batch in (0, 3):
        grads, m, _ = _policy_update_grads(ckpt, "unigrpo", micro_batch, ref_device=torch.device("cpu"))
        for k in whole:
            torch.testing.assert_close(grads[k], whole[k], rtol=1e-5, atol=1e-6)
        assert m["kl_loss"] == pytest.approx(m0["kl_loss"], rel=1e-5) and m0["kl_loss"] > 0


def test_wd1_micro_batch_must_hold_whole_groups(ckpt):
    with pytest.raises(ValueError, match=r"trainer.micro_batch=2: expected 0 or a multiple of algorithm.group_size=4"):
        _policy_update_grads(ckpt, "wd1", 2)


def test_loss_share_of_an_unknown_estimator_is_an_error():
    class Other(Estimator):
        name = "other"

        def plan(self, batch, mu, generator=None):
            return []

        def loss(self, batch, plan, logp, old=None, ref=None):
            return torch.zeros(()), {}

    with pytest.raises(ValueError, match="no micro-batch weighting is known for estimator 'other'"):
        loss_share(Other(), make_batch(), None)


def _learner(ckpt, algorithm, zero_stage=0, **kw):
    return Learner(ckpt, algorithm, OPTIM, zero_stage, rank=0, world_size=1, master_port=free_port(), **kw)


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("algorithm", [{"name": "unigrpo", "mu": 2, "beta": 0.04},
                                       {"name": "coupled_grpo", "mu": 2}])
def test_learner_micro_batches_match_one_pass(ckpt, zero_stage, algorithm):
    batch, runs = make_batch(), {}
    for micro_batch in (0, 1, 2):
        lrn = _learner(ckpt, algorithm, zero_stage, micro_batch=micro_batch)
        try:
            metrics = [lrn.update(batch, seed) for seed in (0, 1)]
            runs[micro_batch] = (lrn.state_dict_for_rollout(), metrics, lrn.engine.global_steps)
        finally:
            lrn.close()
    w0, m0, steps0 = runs[0]
    assert steps0 == 2 * algorithm["mu"]  # one optimizer step per inner step
    for micro_batch in (1, 2):
        w, m, steps = runs[micro_batch]
        assert steps == steps0
        for k in w0:
            # Adam divides by sqrt(v): rounding in a near-zero gradient can move a weight by a hair.
            torch.testing.assert_close(w[k], w0[k], rtol=1e-4, atol=1e-5)
        for a, b in zip(m, m0):
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (micro_batch, k)


# --- ZeRO-3 over two ranks ----------------------------------------------------------------------

UNIGRPO = {"name": "unigrpo", "mu": 2, "beta": 0.04}
ZERO3_RUNS = {
    "plain": {},
    "checkpointed": {"gradient_checkpointing": True},
    "checkpointed_micro": {"gradient_checkpointing": True, "micro_batch": 2},
    "lora": {"lora": LORA},
    "lora_checkpointed": {"lora": LORA, "gradient_checkpointing": True},
}


def _zero3_worker(rank, ckpt, ports, out):
    torch.set_num_threads(1)
    batch, results = make_batch(), {}
    for (name, kw), port in zip(ZERO3_RUNS.items(), ports):
        lrn = Learner(ckpt, UNIGRPO, OPTIM, 3, rank=rank, world_size=2, master_port=port, **kw)
        calls = _count_block_calls(lrn.module)
        results[name] = [lrn.update(batch, seed) for seed in (0, 1)]
        results[f"{name}_block_calls"] = len(calls)
        sd = lrn.state_dict_for_rollout()
        if rank == 0:
            torch.save(sd, os.path.join(out, f"{name}.pt"))
        lrn.close()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.mark.slow
def test_zero3_two_ranks_checkpointing_and_micro_batches_match_plain(ckpt, tmp_path):
    mp.spawn(_zero3_worker, args=(ckpt, [free_port() for _ in ZERO3_RUNS], str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # metrics are all-reduced
    # 2 updates x (mu=2 policy passes + 1 old pass: the first inner step's old log-probs are its own;
    # + 2 reference passes with LoRA, the adapter-disabled policy) x 2 blocks; checkpointing recomputes
    # the policy pass's blocks in backward only; micro_batch=2 splits this rank's 4 rows in two forwards.
    calls = {name: r0.pop(f"{name}_block_calls") for name in ZERO3_RUNS}
    assert calls == {"plain": 12, "checkpointed": 20, "checkpointed_micro": 40, "lora": 20, "lora_checkpointed": 28}
    sd = {name: torch.load(tmp_path / f"{name}.pt") for name in ZERO3_RUNS}
    for name, base in (("checkpointed", "plain"), ("checkpointed_micro", "plain"), ("lora_checkpointed", "lora")):
        for a, b in zip(r0[name], r0[base]):
            for k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (name, k)
        for k in sd[base]:
            torch.testing.assert_close(sd[name][k], sd[base][k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(sd["lora"][k], sd["plain"][k]) for k in sd["plain"])


# --- offload, bf16, reference device: configuration ----------------------------------------------

def test_offload_deepspeed_config():
    from rl.config import OptimConfig

    optim = OptimConfig()
    none = _ds_config(2, optim, cpu=False, bf16=True)
    assert none["zero_optimization"] == {"stage": 2} and none["bf16"] == {"enabled": True}
    opt = _ds_config(2, optim, cpu=False, bf16=True, offload="optimizer")
    assert opt["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    # DeepSpeedCPUAdam, not torch's AdamW, steps the CPU-held states (torch_adam off on CUDA).
    assert opt["optimizer"]["params"]["torch_adam"] is False
    par = _ds_config(3, optim, cpu=False, bf16=False, offload="param")
    assert par["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                        "offload_param": {"device": "cpu", "pin_memory": True}}
    assert _ds_config(0, optim, cpu=True, bf16=False) == _ds_config(0, optim, cpu=True, bf16=False, offload="none")


def test_learner_hands_the_offload_config_to_deepspeed(ckpt, monkeypatch):
    # Offload is CUDA-only; on the CPU only the config the Learner would build can be checked.
    import rl.learner

    seen = {}

    def initialize(model, model_parameters, config):
        seen.update(config)
        raise RuntimeError("stop here")

    monkeypatch.setattr(rl.learner, "check_memory", lambda *a: None)
    monkeypatch.setattr(rl.learner.deepspeed, "initialize", initialize)
    try:
        with pytest.raises(RuntimeError, match="stop here"):
            Learner(ckpt, UNIGRPO, OPTIM, 3, rank=0, world_size=1, master_port=free_port(), offload="param")
    finally:  # the Learner had created its process group; a later Learner in this process needs a fresh one
        if torch.distributed.is_initialized():
            rl.learner.deepspeed.comm.destroy_process_group()
    assert seen["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert seen["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": True}


@pytest.mark.parametrize("args,message", [
    (("cuda", 0, "optimizer", "same"), r"trainer.offload='optimizer': needs trainer.zero_stage >= 1, got 0"),
    (("cuda", 2, "param", "same"), r"trainer.offload='param': needs trainer.zero_stage=3, got 2"),
    (("cpu", 3, "optimizer", "same"), r"trainer.offload='optimizer': expected none with trainer.device=cpu"),
    (("cuda", 3, "disk", "same"), r"trainer.offload='disk': expected one of \['none', 'optimizer', 'param'\]"),
    (("cuda", 0, "none", "gpu"), r"trainer.ref_device='gpu': expected one of \['same', 'cpu'\]"),
    (("cuda", 0, "none", "cpu", LORA), r"trainer.ref_device='cpu': expected same with model.lora"),
    (("cpu", 0, "none", "same", None, True), r"model.dtype='bfloat16': expected float32 with trainer.device=cpu"),
])
def test_check_memory_names_the_key(args, message):
    with pytest.raises(ConfigError, match=message):
        check_memory(*args)


def test_check_memory_accepts_the_possible_combinations():
    check_memory("cuda", 1, "optimizer", "cpu", None, True)
    check_memory("cuda:0", 3, "param", "same", LORA, True)
    check_memory("cpu", 0, "none", "cpu")  # a CPU reference while training on the CPU: nothing to move


@pytest.mark.parametrize("overrides,message", [
    (["model.dtype=bfloat16"], r"model.dtype='bfloat16': expected float32 with trainer.device=cpu"),
    (["trainer.offload=optimizer"], r"trainer.offload='optimizer': expected none with trainer.device=cpu"),
    (["trainer.offload=nvme"], r"trainer.offload='nvme': expected one of"),
    (["trainer.micro_batch=-1"], r"trainer.micro_batch=-1: expected an integer >= 0"),
    (["trainer.ref_device=cpu", "model.lora={r: 4}"], r"trainer.ref_device='cpu': expected same with model.lora"),
    (["algorithm=wd1", "algorithm.group_size=4", "trainer.micro_batch=6"],
     r"trainer.micro_batch=6: expected 0 or a multiple of algorithm.group_size=4"),
])
def test_validate_rejects_impossible_memory_settings(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg(*overrides))


def test_model_config_checks_gradient_checkpointing():
    from rl.config import ModelConfig

    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing='yes': expected true or false"):
        ModelConfig(gradient_checkpointing="yes")


def test_validate_accepts_the_memory_settings_on_the_cpu():
    c = validate(compose_cfg("model.gradient_checkpointing=true", "trainer.micro_batch=2", "trainer.ref_device=cpu"))
    assert c.model.gradient_checkpointing and c.trainer.micro_batch == 2 and c.trainer.offload == "none"


@pytest.mark.parametrize("change,message", [
    (dict(offload="optimizer"), r"trainer.offload='optimizer': expected none with trainer.device=cpu"),
    (dict(ref_device="cpu", lora=LORA), r"trainer.ref_device='cpu': expected same with model.lora"),
    (dict(micro_batch=-2), r"micro_batch=-2: expected an integer >= 0"),
])
def test_learner_rejects_impossible_memory_settings(change, message):
    with pytest.raises(ValueError, match=message):
        Learner("/nonexistent", UNIGRPO, OPTIM, 0, rank=0, world_size=1, master_port=free_port(), **change)


def test_cpu_reference_on_cpu_training_is_the_usual_one(ckpt):
    lrn = _learner(ckpt, UNIGRPO, ref_device="cpu")
    try:
        assert lrn.ref_device is None and next(lrn.ref.parameters()).device.type == "cpu"
    finally:
        lrn.close()


def test_learner_loads_fp32_weights_and_rollout_worker_holds_the_requested_dtype(ckpt):
    from rollout.worker import RolloutWorker

    worker = RolloutWorker(ckpt, {"sampler": "reference", "gen_length": 4, "steps": 2, "block_length": 4},
                           dtype="bfloat16")
    assert {p.dtype for p in worker.model.parameters()} == {torch.bfloat16}
    fp32 = {k: v.float() for k, v in load_model(ckpt).state_dict().items()}
    worker.load_weights(fp32)  # the learner's fp32 weights, cast into the worker's bf16
    assert {p.dtype for p in worker.model.parameters()} == {torch.bfloat16}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 training, offload and a CPU reference need CUDA")
@pytest.mark.parametrize("kw", [dict(bf16=True), dict(bf16=True, zero_stage=2, offload="optimizer"),
                                dict(ref_device="cpu"), dict(gradient_checkpointing=True, micro_batch=2)])
def test_cuda_memory_options_update(ckpt, kw):
    kw = dict(kw)
    lrn = Learner(ckpt, UNIGRPO, OPTIM, kw.pop("zero_stage", 0), rank=0, world_size=1, master_port=free_port(),
                  device="cuda", **kw)
    try:
        m = lrn.update(make_batch(), seed=0)
        assert m["skipped_steps"] == 0 and all(torch.isfinite(torch.tensor(v)) for v in m.values())
        if kw.get("ref_device") == "cpu":
            assert next(lrn.ref.parameters()).device.type == "cpu"
    finally:
        lrn.close()


# --- through the driver ---------------------------------------------------------------------------

def test_driver_passes_the_memory_options_to_the_learners(local_ray, tmp_path):
    from tests.test_train import run

    one_step = ["trainer.total_steps=1", "trainer.save_every=0", "trainer.val_every=0",
                "trainer.val_before_train=false"]
    plain = run(tmp_path, *one_step, name="plain")[-1]
    mem = run(tmp_path, *one_step, "model.gradient_checkpointing=true", "trainer.micro_batch=1",
              "trainer.ref_device=cpu", name="memory")[-1]
    # The same rollouts (same seed, same initial weights), hence the same update up to rounding.
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "reward/mean"):
        assert mem[key] == pytest.approx(plain[key], rel=1e-4, abs=1e-6), key
