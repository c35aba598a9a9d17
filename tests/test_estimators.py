"""Estimators and losses checked against independent hand computations on tiny inputs.

The toy model's logits at a position depend only on the token there and its index, so a masked
answer token's log-prob is known in closed form (computed here with plain Python math).
"""
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from rl.advantages import group_advantages
from rl.batch import RolloutBatch
from rl.estimators import (
    REGISTRY,
    MaskPlan,
    TokenLogps,
    aggregate,
    build_estimator,
    kl_penalty,
    unigrpo_timesteps,
)

torch.set_num_threads(1)

VOCAB = 7
MASK = 6
P, L = 3, 4


class LookupLM(torch.nn.Module):
    """logits[b, j] = emb[x[b, j]] + pos[j]; records every input it is called with."""

    def __init__(self, seed: int, T: int = P + L):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=g))
        self.pos = torch.nn.Parameter(torch.randn(T, VOCAB, generator=g))
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        return SimpleNamespace(logits=self.emb[input_ids] + self.pos[: input_ids.shape[1]])

    def masked_logp(self, j: int, y: int) -> float:
        row = (self.emb[MASK] + self.pos[j]).tolist()
        return row[y] - math.log(sum(math.exp(v) for v in row))

    def masked_entropy(self, j: int) -> float:
        row = (self.emb[MASK] + self.pos[j]).tolist()
        z = sum(math.exp(v) for v in row)
        return -sum(math.exp(v) / z * (v - math.log(z)) for v in row)


def make_batch(advantages=(1.0, -0.5, 0.25, -1.0), group_size=2):
    return RolloutBatch(
        prompt_ids=torch.tensor([[0, 3, 4], [2, 1, 5], [0, 0, 4], [1, 2, 3]]),
        prompt_mask=torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]]),
        answer_ids=torch.tensor([[1, 2, 3, 5], [4, 5, 5, 5], [2, 2, 1, 5], [5, 5, 5, 5]]),
        answer_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float),
        advantages=torch.tensor(advantages),
        group_size=group_size,
    )


def big_batch(B=4, Pl=50, La=500):
    g = torch.Generator().manual_seed(7)
    prompt_mask = torch.ones(B, Pl, dtype=torch.long)
    prompt_mask[:, :10] = 0
    answer_mask = torch.ones(B, La)
    answer_mask[:, La - 50:] = 0
    return RolloutBatch(
        prompt_ids=torch.randint(0, 5, (B, Pl), generator=g), prompt_mask=prompt_mask,
        answer_ids=torch.randint(0, 5, (B, La), generator=g), answer_mask=answer_mask,
        advantages=torch.zeros(B), group_size=2,
    )


def hand_plan(batch, answer_noise_views, prompt_noise=None):
    """A MaskPlan from explicit answer masks (list of [B, L] 0/1 lists), prompt clean by default."""
    ans = torch.tensor(answer_noise_views, dtype=torch.bool)
    V, B = ans.shape[:2]
    pr = torch.zeros(V, B, P, dtype=torch.bool) if prompt_noise is None else prompt_noise
    return MaskPlan(torch.cat([pr, ans], -1), ans & (batch.answer_mask > 0))


def run_learner(est, batch, mu, policy, ref_model, seed=0, lr=0.0):
    """Exactly the learner loop the estimators are designed for."""
    gen = torch.Generator().manual_seed(seed)
    plans = est.plan(batch, mu, gen)
    with torch.no_grad():
        old = [est.token_logps(policy, batch, p, MASK) for p in plans] if est.needs_old else [None] * mu
        ref = [est.token_logps(ref_model, batch, p, MASK) for p in plans] if est.needs_ref else [None] * mu
    out = []
    for n in range(mu):
        logp = est.token_logps(policy, batch, plans[n], MASK)
        loss, metrics = est.loss(batch, plans[n], logp, old[n], ref[n])
        loss.backward()
        out.append((loss, metrics, logp, old[n], ref[n]))
    return plans, out


def masked_input(batch, plan, v=0):
    return torch.where(plan.noise[v], MASK, batch.input_ids)


SIBLING_KW = {"spg": {"block_length": 2}}


# ---------------------------------------------------------------- advantages

def test_group_advantages_std_on_and_off():
    r = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    mean, std = 0.75, math.sqrt(((0.25 ** 2) + 0.75 ** 2 + 1.25 ** 2 + 0.75 ** 2) / 3)  # unbiased, n-1
    expected = [(x - mean) / (std + 1e-4) for x in (1.0, 0.0, 2.0, 0.0)] + [0.0] * 4
    assert torch.allclose(group_advantages(r, 4), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(group_advantages(r, 4, scale_by_std=False),
                          torch.tensor([0.25, -0.75, 1.25, -0.75, 0, 0, 0, 0]))
    assert torch.equal(group_advantages(r, 1), torch.zeros(8))


def test_group_advantages_leave_one_out_is_diffucoders():
    """DiffuCoder's coupled-GRPO: b_i = (sum_g r - r_i) / (G - 1), no G/(G-1) factor, no std by default."""
    r = torch.tensor([1.0, 0.0, 2.0, 0.0, 3.0, 3.0, 3.0, 3.0])
    # group 1: sum 3, baselines 2/3, 1, 1/3, 1; group 2: identical rewards, so 0
    loo = [1 - 2 / 3, 0 - 1.0, 2 - 1 / 3, 0 - 1.0, 0, 0, 0, 0]
    got = group_advantages(r, 4, scale_by_std=False, baseline="leave_one_out")
    assert got.tolist() == pytest.approx(loo, abs=1e-6)
    # = G/(G-1) times the mean-centred advantage: the only difference from baseline="mean"
    assert torch.allclose(got, group_advantages(r, 4, scale_by_std=False) * 4 / 3, atol=1e-6)
    std = math.sqrt((0.25 ** 2 + 0.75 ** 2 + 1.25 ** 2 + 0.75 ** 2) / 3)  # unbiased, as DiffuCoder's torch.std
    scaled = group_advantages(r, 4, scale_by_std=True, baseline="leave_one_out")
    assert scaled.tolist() == pytest.approx([a / (std + 1e-4) for a in loo[:4]] + [0.0] * 4, abs=1e-6)
    assert torch.equal(group_advantages(r, 1, baseline="leave_one_out"), torch.zeros(8))


@pytest.mark.parametrize("name, baseline, scale", [
    ("coupled_grpo", "leave_one_out", False), ("unigrpo", "mean", True), ("diffu_grpo", "mean", False),
    ("wd1", "mean", False), ("spg", "mean", False),
])
def test_algorithm_advantage_defaults(name, baseline, scale):
    """coupled_grpo trains on DiffuCoder's advantage (scale_rewards: false, leave-one-out)."""
    conf = _algorithm_conf(name)
    assert conf["adv_baseline"] == baseline and conf["scale_adv_by_std"] is scale


@pytest.mark.parametrize("kwargs, key", [
    (dict(group_size=3), "group_size"), (dict(group_size=0), "group_size"), (dict(group_size=2, eps=-1.0), "eps"),
    (dict(group_size=2, baseline="median"), "adv_baseline"),
])
def test_group_advantages_errors(kwargs, key):
    with pytest.raises(ValueError, match=key):
        group_advantages(torch.zeros(4), **kwargs)


# ---------------------------------------------------------------- shared pieces

def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -0.5]), torch.tensor([-2.0, -0.5])
    assert torch.allclose(kl_penalty(logp, ref, "k1"), torch.tensor([1.0, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k2"), torch.tensor([0.5, 0.0]))
    assert torch.allclose(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-1), 0.0]))


def test_low_var_kl_is_verls_bounded_k3():
    # A token 12 nats below the reference would give exp(12) ~ 1.6e5 and a gradient to match.
    logp = torch.tensor([-14.0, -3.0, -2.0, -40.0], requires_grad=True)
    ref = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    kl = kl_penalty(logp, ref, "low_var_kl")
    assert torch.allclose(kl, torch.tensor([10.0, math.exp(1) - 2, 0.0, 10.0]))
    kl.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] == pytest.approx(-(math.exp(1) - 1)) and logp.grad[3] == 0


def test_k3_is_the_unbounded_d1_diffucoder_form():
    # d1 and DiffuCoder: exp(ref - logp) - (ref - logp) - 1, no clamp, at a log-ratio of 12 nats too.
    logp = torch.tensor([-14.0, -3.0, -2.0, -1.0], dtype=torch.float64, requires_grad=True)
    ref = torch.full((4,), -2.0, dtype=torch.float64)
    kl = kl_penalty(logp, ref, "k3")
    hand = [math.exp(r - lp) - (r - lp) - 1 for lp, r in zip(logp.tolist(), ref.tolist())]
    assert kl.tolist() == pytest.approx(hand, rel=1e-12)
    assert kl[0].item() == pytest.approx(math.exp(12) - 13) and kl[0].item() > 1e5
    kl.sum().backward()  # d/dlogp = 1 - exp(ref - logp): unbounded too
    assert logp.grad.tolist() == pytest.approx([1 - math.exp(-2.0 - lp) for lp in (-14.0, -3.0, -2.0, -1.0)])


def _algorithm_conf(name):
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "algorithm" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("name, kl", [("unigrpo", "low_var_kl"), ("diffu_grpo", "k3"), ("coupled_grpo", "k3")])
def test_kl_estimator_defaults_per_algorithm(name, kl):
    """UniGRPO keeps verl's bound (the multimodal recipes needed it); d1 and DiffuCoder do not cap."""
    assert build_estimator(name).kl == kl
    assert _algorithm_conf(name)["hyper"]["kl"] == kl


def test_aggregations():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    w = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert aggregate(x, w, "token_mean").item() == pytest.approx((1 + 2 + 3 + 4) / 4)
    # The row with no counted token is left out, not averaged in as 0 or NaN.
    assert aggregate(x, w, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)


def test_token_logps_closed_form_and_entropy():
    batch, model = make_batch(), LookupLM(0)
    plan = hand_plan(batch, [[[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]]])
    est = build_estimator("unigrpo", mask_id=MASK)
    out = est.token_logps(model, batch, plan)  # mask_id stored on the estimator
    for b in range(4):
        for j in range(L):
            if plan.score[0, b, j]:
                y = int(batch.answer_ids[b, j])
                assert out.logp[0, b, j].item() == pytest.approx(model.masked_logp(P + j, y), abs=1e-5)
                assert out.entropy[0, b, j].item() == pytest.approx(model.masked_entropy(P + j), abs=1e-5)
            else:
                assert out.logp[0, b, j].item() == 0.0
    assert out.logp.dtype == torch.float32
    with torch.no_grad():
        assert est.token_logps(model, batch, plan).entropy is None  # no-grad old/ref passes skip it


# ---------------------------------------------------------------- UniGRPO

def test_unigrpo_schedule_formula():
    assert unigrpo_timesteps(0.1, 1000, 5) == [100, 325, 550, 775, 1000]
    assert unigrpo_timesteps(0.0, 1000, 5) == [0, 250, 500, 750, 1000]
    assert unigrpo_timesteps(0.35, 10, 3) == [3, 6, 10]
    assert unigrpo_timesteps(0.4567, 1000, 1) == [456]
    for r in [0.0, 0.013, 0.1, 0.37, 0.5, 0.999]:
        for T in (10, 1000):
            for mu in (2, 3, 4, 7):
                t1 = math.floor(r * T)
                ref = [t1] + [math.floor(Fraction(n - 1, mu - 1) * (T - t1) + t1) for n in range(2, mu + 1)]
                assert unigrpo_timesteps(r, T, mu) == ref


def test_unigrpo_plan_draws_r_from_generator_and_follows_schedule():
    batch = big_batch()
    est = build_estimator("unigrpo", T=1000)
    plans = est.plan(batch, 4, torch.Generator().manual_seed(3))
    r = float(torch.rand((), generator=torch.Generator().manual_seed(3)))
    steps = unigrpo_timesteps(r, 1000, 4)
    valid = batch.answer_mask > 0
    for plan, t in zip(plans, steps):
        assert plan.t == t / 1000
        ans = plan.noise[0, :, batch.prompt_len:]
        assert ans.float().mean().item() == pytest.approx(t / 1000, abs=0.03)
        assert torch.equal(plan.score[0], ans & valid)
    # A fresh r for the next rollout batch.
    again = est.plan(batch, 4, torch.Generator().manual_seed(4))
    assert again[0].t != plans[0].t


def test_unigrpo_never_masks_prompt_and_sees_same_input_everywhere():
    batch, policy, ref = make_batch(), LookupLM(0), LookupLM(1)
    mu = 5
    est = build_estimator("unigrpo", T=10)
    plans, _ = run_learner(est, batch, mu, policy, ref)
    assert len(policy.calls) == 2 * mu and len(ref.calls) == mu
    for n, plan in enumerate(plans):
        x_old, x_new, x_ref = policy.calls[n][0], policy.calls[mu + n][0], ref.calls[n][0]
        assert torch.equal(x_old, x_new) and torch.equal(x_old, x_ref)
        assert torch.equal(x_old, masked_input(batch, plan))
        # prompt (padding included) is untouched; answer tokens are clean or the mask token
        assert torch.equal(x_old[:, :P], batch.prompt_ids)
        ans = x_old[:, P:]
        assert torch.all((ans == batch.answer_ids) | (ans == MASK))
        assert torch.equal(policy.calls[n][1], batch.attention_mask)
        assert not plan.noise[0, :, :P].any()


def test_unigrpo_guarantees_a_masked_token_per_row():
    batch = make_batch()
    batch.answer_mask[3] = 0  # a row with nothing to score stays unmasked
    est = build_estimator("unigrpo")
    for seed in range(5):
        plan = est.masked_view(batch, 0.0, torch.Generator().manual_seed(seed))
        counts = plan.score[0].sum(-1).tolist()
        assert counts == [1, 1, 1, 0]
        assert plan.noise[0].sum().item() == 3


def test_only_policy_gets_gradients():
    batch, policy, old_model, ref = make_batch(), LookupLM(0), LookupLM(0), LookupLM(2)
    est = build_estimator("unigrpo", beta=0.1)
    gen = torch.Generator().manual_seed(0)
    plans = est.plan(batch, 2, gen)
    with torch.no_grad():
        old = [est.token_logps(old_model, batch, p, MASK) for p in plans]
        refs = [est.token_logps(ref, batch, p, MASK) for p in plans]
    assert not any(o.logp.requires_grad for o in old + refs)
    logp = est.token_logps(policy, batch, plans[0], MASK)
    loss, _ = est.loss(batch, plans[0], logp, old[0], refs[0])
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert all(p.grad is None for p in list(old_model.parameters()) + list(ref.parameters()))


def _hand_grpo(batch, plan_mask, new, old, ref, A, eps, beta, kl, per_token=None):
    """Clipped GRPO + KL with explicit loops. plan_mask[b][j] = counted; new/old/ref: callables (b, j)."""
    toks, rows = [], []
    for b in range(len(A)):
        row = []
        for j in range(L):
            if not plan_mask[b][j]:
                continue
            n, o = new(b, j), old(b, j)
            ratio = math.exp(n - o)
            surr = min(ratio * A[b], min(max(ratio, 1 - eps), 1 + eps) * A[b])
            pen = 0.0
            if beta:
                r_ = ref(b, j)
                d = min(max(r_ - n, -20.0), 20.0)
                pen = {"k1": n - r_, "k2": 0.5 * (n - r_) ** 2, "k3": math.exp(r_ - n) - (r_ - n) - 1,
                       "low_var_kl": min(math.exp(d) - d - 1, 10.0)}[kl]  # verl's bound
            row.append(-surr + beta * pen)
        toks += row
        if row:
            rows.append(sum(row) / len(row))
    return sum(toks) / len(toks), sum(rows) / len(rows)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3", "low_var_kl"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_unigrpo_loss_matches_hand_computation(kl, aggregation):
    batch = make_batch()
    policy, old_m, ref_m = LookupLM(0), LookupLM(1), LookupLM(2)
    noise = [[1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    plan = hand_plan(batch, [noise])
    est = build_estimator("unigrpo", eps=0.2, beta=0.04, kl=kl, aggregation=aggregation)
    with torch.no_grad():
        old, ref = est.token_logps(old_m, batch, plan, MASK), est.token_logps(ref_m, batch, plan, MASK)
    loss, metrics = est.loss(batch, plan, est.token_logps(policy, batch, plan, MASK), old, ref)
    y = batch.answer_ids.tolist()
    counted = plan.score[0].tolist()
    tm, sm = _hand_grpo(batch, counted, lambda b, j: policy.masked_logp(P + j, y[b][j]),
                        lambda b, j: old_m.masked_logp(P + j, y[b][j]),
                        lambda b, j: ref_m.masked_logp(P + j, y[b][j]), batch.advantages.tolist(), 0.2, 0.04, kl)
    assert loss.item() == pytest.approx(tm if aggregation == "token_mean" else sm, abs=1e-5)
    assert metrics["kl_loss"] > 0 if kl != "k1" else True
    assert set(metrics) >= {"pg_loss", "pg_clipfrac", "ppo_kl", "kl_loss", "entropy"}


def test_beta_zero_is_exactly_clipped_surrogate_and_skips_ref():
    batch, policy, ref = make_batch(), LookupLM(0), LookupLM(1)
    est = build_estimator("unigrpo", beta=0.0)
    assert not est.needs_ref and est.needs_old
    _, out = run_learner(est, batch, 3, policy, ref)
    assert ref.calls == []
    for loss, metrics, logp, old, _ in out:
        assert loss.item() == metrics["pg_loss"] and metrics["kl_loss"] == 0.0
    # Against a hand computation with a different old policy, so the ratio is not 1.
    old_m = LookupLM(3)
    plan = hand_plan(batch, [[[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]]])
    with torch.no_grad():
        old = est.token_logps(old_m, batch, plan, MASK)
    loss, _ = est.loss(batch, plan, est.token_logps(policy, batch, plan, MASK), old, None)
    y = batch.answer_ids.tolist()
    _, sm = _hand_grpo(batch, plan.score[0].tolist(), lambda b, j: policy.masked_logp(P + j, y[b][j]),
                       lambda b, j: old_m.masked_logp(P + j, y[b][j]), None, batch.advantages.tolist(),
                       0.2, 0.0, "k3")
    assert loss.item() == pytest.approx(sm, abs=1e-6)  # the default is MMaDA eq. 5's per-answer mean


def test_unigrpo_default_normalisation_is_mmada_eq5():
    """MMaDA eq. 5: 1/G sum_i 1/|o_i| sum_t, with |o_i| the masked answer tokens of o_i at this inner
    step. Two answers: o_0 has 3 masked tokens at ratios 1.1, 0.9, 1.0 (A = +1), o_1 one masked token
    at ratio 1.1 (A = -1, clipped side: min(-1.1, -1.1) = -1.1). Answer means: -(1.1 + 0.9 + 1.0)/3 = -1
    and +1.1, so eq. 5 gives (-1 + 1.1) / 2 = 0.05; pooling the 4 tokens would give (-3 + 1.1)/4 = -0.475."""
    est = build_estimator("unigrpo", beta=0.0)
    assert est.aggregation == "seq_mean_token_mean"
    assert _algorithm_conf("unigrpo")["hyper"]["aggregation"] == "seq_mean_token_mean"
    batch = make_batch(advantages=(1.0, -1.0, 0.0, 0.0))
    batch.answer_mask[2:] = 0  # rows 2 and 3 have no counted token: left out of the mean over answers
    plan = hand_plan(batch, [[[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    new = torch.zeros(1, 4, L)
    new[0, 0, :3] = torch.log(torch.tensor([1.1, 0.9, 1.0]))
    new[0, 1, 0] = math.log(1.1)
    loss, _ = est.loss(batch, plan, TokenLogps(new), TokenLogps(torch.zeros(1, 4, L)))
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    pooled, _ = build_estimator("unigrpo", beta=0.0, aggregation="token_mean").loss(
        batch, plan, TokenLogps(new), TokenLogps(torch.zeros(1, 4, L)))
    assert pooled.item() == pytest.approx(-0.475, abs=1e-6)
    # With the KL term (beta 0.04, low_var_kl): each answer's mean of (clip term + beta * k3).
    ref = torch.zeros(1, 4, L)
    ref[0, 0, 0], ref[0, 1, 0] = 0.5, -0.3
    def k3(lp, r):
        return math.exp(r - lp) - (r - lp) - 1

    kl0 = (k3(math.log(1.1), 0.5) + k3(math.log(0.9), 0.0) + k3(0.0, 0.0)) / 3
    kl1 = k3(math.log(1.1), -0.3)
    est_kl = build_estimator("unigrpo")
    loss, m = est_kl.loss(batch, plan, TokenLogps(new), TokenLogps(torch.zeros(1, 4, L)), TokenLogps(ref))
    assert loss.item() == pytest.approx(0.05 + 0.04 * (kl0 + kl1) / 2, abs=1e-6)
    assert m["kl_loss"] == pytest.approx((kl0 + kl1) / 2, abs=1e-6)


def test_clipfrac_and_ppo_kl():
    batch = make_batch(advantages=(1.0, 1.0, -1.0, -1.0))
    batch.answer_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float)
    plan = hand_plan(batch, [[[1, 1, 1, 1]] * 4])
    est = build_estimator("unigrpo", eps=0.2, beta=0.0)
    ratios = [[1.5, 0.5], [1.1, 1.0], [0.5, 1.5], [0.9, 1.3]]
    # clipped branch is the minimum: A>0 and r>1.2 ; A<0 and r<0.8  -> (0,0), (2,0)
    old = torch.zeros(1, 4, L)
    new = torch.zeros(1, 4, L)
    new[0, :, :2] = torch.log(torch.tensor(ratios))
    loss, m = est.loss(batch, plan, TokenLogps(new), TokenLogps(old))
    assert m["pg_clipfrac"] == pytest.approx(2 / 8)
    assert m["ppo_kl"] == pytest.approx(-sum(math.log(r) for row in ratios for r in row) / 8, abs=1e-6)
    surr = [min(r * a, min(max(r, 0.8), 1.2) * a) for row, a in zip(ratios, (1, 1, -1, -1)) for r in row]
    assert loss.item() == pytest.approx(-sum(surr) / 8, abs=1e-6)
    # old=None means on-policy: ratio 1, loss = -mean(A) over counted tokens
    loss1, m1 = est.loss(batch, plan, TokenLogps(new), None)
    assert loss1.item() == pytest.approx(0.0) and m1["ppo_kl"] == 0.0


def test_eps_high_is_the_upper_clip():
    """Asymmetric clipping (DAPO's clip-higher): 1 - eps below, 1 + eps_high above."""
    batch = make_batch(advantages=(1.0, 1.0, -1.0, -1.0))
    batch.answer_mask = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.float)
    plan = hand_plan(batch, [[[1, 1, 1, 1]] * 4])
    ratios = [[1.25, 1.35], [1.1, 1.0], [0.75, 1.25], [0.9, 1.3]]
    new = torch.zeros(1, 4, L)
    new[0, :, :2] = torch.log(torch.tensor(ratios))
    for name in ("unigrpo", "diffu_grpo"):
        est = build_estimator(name, eps=0.2, eps_high=0.28, beta=0.0, aggregation="token_mean")
        loss, m = est.loss(batch, plan, TokenLogps(new), TokenLogps(torch.zeros(1, 4, L)))
        # A>0: 1.25 is inside [0.8, 1.28] (a symmetric 0.2 would clip it), 1.35 clips to 1.28.
        # A<0: 0.75 clips to 0.8; 1.25 and 1.3 are past the upper bound but the unclipped branch is smaller.
        surr = [min(r * a, min(max(r, 0.8), 1.28) * a) for row, a in zip(ratios, (1, 1, -1, -1)) for r in row]
        assert surr[0] == pytest.approx(1.25)
        assert loss.item() == pytest.approx(-sum(surr) / 8, abs=1e-6)
        assert m["pg_clipfrac"] == pytest.approx(2 / 8)  # 1.35 (A>0) and 0.75 (A<0)
        assert build_estimator(name, eps=0.2).eps_high == 0.2  # unset: symmetric


# ---------------------------------------------------------------- siblings

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_estimator_runs_the_learner_loop_with_consistent_inputs(name):
    batch, policy, ref = make_batch(), LookupLM(0), LookupLM(1)
    est = build_estimator(name, **SIBLING_KW.get(name, {}))
    mu = 3
    plans, out = run_learner(est, batch, mu, policy, ref)
    assert len(plans) == mu
    n_old = mu if est.needs_old else 0
    assert len(policy.calls) == n_old + mu and len(ref.calls) == (mu if est.needs_ref else 0)
    for n, plan in enumerate(plans):
        V = plan.num_views
        expect = torch.cat([masked_input(batch, plan, v) for v in range(V)])
        assert torch.equal(policy.calls[n_old + n][0], expect)
        if est.needs_old:
            assert torch.equal(policy.calls[n][0], expect)
        if est.needs_ref:
            assert torch.equal(ref.calls[n][0], expect)
        assert torch.equal(policy.calls[n_old + n][0][:, :P][batch.prompt_mask.repeat(V, 1) == 0],
                           batch.prompt_ids.repeat(V, 1)[batch.prompt_mask.repeat(V, 1) == 0])
    for loss, metrics, logp, old, r in out:
        assert loss.dim() == 0 and math.isfinite(loss.item())
        assert math.isfinite(metrics["entropy"])
        for o in (old, r):
            assert o is None or not o.logp.requires_grad
    assert all(p.grad is not None for p in policy.parameters())
    assert all(p.grad is None for p in ref.parameters())


def test_diffu_grpo_plan_and_loss():
    est = build_estimator("diffu_grpo")
    assert (est.eps, est.beta, est.kl, est.p_mask_prompt) == (0.5, 0.04, "k3", 0.15)
    big = big_batch()
    plans = est.plan(big, 2, torch.Generator().manual_seed(0))
    for plan in plans:
        pr, ans = plan.noise[0, :, :big.prompt_len], plan.noise[0, :, big.prompt_len:]
        assert ans.all() and not pr[big.prompt_mask == 0].any()
        assert pr[big.prompt_mask == 1].float().mean().item() == pytest.approx(0.15, abs=0.04)
        assert torch.equal(plan.score[0], big.answer_mask > 0)
    assert not torch.equal(plans[0].noise, plans[1].noise)  # a fresh prompt mask per inner step

    batch, policy, old_m, ref_m = make_batch(), LookupLM(0), LookupLM(1), LookupLM(2)
    plan = est.plan(batch, 1, torch.Generator().manual_seed(1))[0]
    with torch.no_grad():
        old, ref = est.token_logps(old_m, batch, plan, MASK), est.token_logps(ref_m, batch, plan, MASK)
    loss, _ = est.loss(batch, plan, est.token_logps(policy, batch, plan, MASK), old, ref)
    y, counted = batch.answer_ids.tolist(), (batch.answer_mask > 0).tolist()
    tm, _ = _hand_grpo(batch, counted, lambda b, j: policy.masked_logp(P + j, y[b][j]),
                       lambda b, j: old_m.masked_logp(P + j, y[b][j]),
                       lambda b, j: ref_m.masked_logp(P + j, y[b][j]), batch.advantages.tolist(), 0.5, 0.04, "k3")
    assert loss.item() == pytest.approx(tm, abs=1e-5)


def test_coupled_plan_views():
    est = build_estimator("coupled_grpo")
    big = big_batch()
    plans = est.plan(big, 4, torch.Generator().manual_seed(0))
    valid = big.answer_mask > 0
    assert len({p.t for p in plans}) == 4
    for plan in plans:
        assert 0.2 <= plan.t <= 0.8 and plan.num_views == 3
        assert not plan.noise[:, :, :big.prompt_len].any()
        full, m1, m2 = (plan.noise[v, :, big.prompt_len:] for v in range(3))
        assert full.all() and torch.equal(m1, ~m2)
        assert m1.float().mean().item() == pytest.approx(plan.t, abs=0.03)
        for v, m in enumerate((full, m1, m2)):
            assert torch.equal(plan.score[v], m & valid)
    no_full = build_estimator("coupled_grpo", full_mask_view=False).plan(big, 1)[0]
    assert no_full.num_views == 2


@pytest.mark.parametrize("full", [True, False])
def test_coupled_loss_matches_hand_computation(full):
    batch = make_batch()
    t = 0.25
    m1 = [[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 1]]
    m2 = [[1 - v for v in row] for row in m1]
    views = ([[[1] * L] * 4] if full else []) + [m1, m2]
    plan = hand_plan(batch, views)
    plan.t = t
    g = torch.Generator().manual_seed(5)
    V = len(views)
    new, old, ref = (-torch.rand(V, 4, L, generator=g) * 2 for _ in range(3))
    new, old, ref = (x * plan.score for x in (new, old, ref))
    est = build_estimator("coupled_grpo", eps=0.2, beta=0.05, full_mask_view=full)
    loss, _ = est.loss(batch, plan, TokenLogps(new), TokenLogps(old), TokenLogps(ref))

    def combined(x):
        def f(b, j):
            o = 1 if full else 0
            c = x[o, b, j].item() / t if m1[b][j] else x[o + 1, b, j].item() / (1 - t)
            return (x[0, b, j].item() + c) / 2 if full else c
        return f

    counted = (batch.answer_mask > 0).tolist()
    tm, _ = _hand_grpo(batch, counted, combined(new), combined(old), combined(ref),
                       batch.advantages.tolist(), 0.2, 0.05, "k3")
    assert loss.item() == pytest.approx(tm, abs=1e-5)


def test_wd1_matches_hand_computation():
    batch = make_batch(advantages=(1.0, -1.0, 0.5, -0.5))
    est = build_estimator("wd1", temperature=0.5)
    assert not est.needs_old and not est.needs_ref
    plan = est.plan(batch, 1, torch.Generator().manual_seed(0))[0]
    assert plan.noise[0, :, P:].all()
    lp = -torch.rand(1, 4, L, generator=torch.Generator().manual_seed(1)) * plan.score
    lp.requires_grad_(True)
    loss, _ = est.loss(batch, plan, TokenLogps(lp))
    S = [sum(lp[0, b, j].item() for j in range(L) if batch.answer_mask[b, j] > 0) for b in range(4)]
    A = [a / 0.5 for a in batch.advantages.tolist()]
    groups = []
    for g0 in (0, 2):
        a = A[g0:g0 + 2]
        pos = [math.exp(x) / sum(math.exp(z) for z in a) for x in a]
        neg = [math.exp(-x) / sum(math.exp(-z) for z in a) for x in a]
        groups.append(sum(-pw * s + nw * s for pw, nw, s in zip(pos, neg, S[g0:g0 + 2])))
    assert loss.item() == pytest.approx(sum(groups) / 2, abs=1e-6)
    loss.backward()
    assert lp.grad[0, 0, 0] < 0 and lp.grad[0, 1, 0] > 0  # raise the better answer, lower the worse
    bad = make_batch(group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        est.loss(bad, plan, TokenLogps(lp))


def _spg_hand(batch, score, lp, A, beta, w, mode):
    """SPG's bounds with loops, as spg_trainer._get_per_seq_logps computes them (p = exp(logp))."""
    V, B = len(score), len(A)
    seqs, cs = [], []
    for b in range(B):
        c = sum(1 for j in range(L) if batch.answer_mask[b, j] > 0)
        elbo_v, n_v = [], []
        for v in range(V):
            idx = [j for j in range(L) if score[v][b][j]]
            n_v.append(len(idx))
            elbo_v.append(sum(lp[v][b][j] for j in idx) / max(len(idx), 1))
        elbo = sum(elbo_v) / V
        logs = []
        for j in range(L):
            avg = sum(math.exp(lp[v][b][j]) ** beta / (n_v[v] / c) for v in range(V) if score[v][b][j]) / V
            if avg > 0:
                logs.append(math.log(avg))
        eubo = sum(logs) / max(len(logs), 1) / beta
        neg = {"elbo": elbo, "eubo": eubo, "mix": w * eubo + (1 - w) * elbo}[mode]
        seqs.append(elbo if A[b] > 0 else neg)
        cs.append(c)
    return sum(-a * s * c for a, s, c in zip(A, seqs, cs)) / sum(cs)


@pytest.mark.parametrize("mode", ["mix", "eubo", "elbo"])
def test_spg_loss_matches_hand_computation(mode):
    batch = make_batch(advantages=(1.0, -0.5, 0.25, -1.0))
    views = [[[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]],
             [[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]]]
    plan = hand_plan(batch, views)
    lp = -torch.rand(2, 4, L, generator=torch.Generator().manual_seed(2)) * 3 * plan.score
    est = build_estimator("spg", block_length=2, logp_estimation=mode, eubo_beta=1.5, mix_weight=0.3)
    loss, _ = est.loss(batch, plan, TokenLogps(lp))
    expected = _spg_hand(batch, plan.score.tolist(), lp.tolist(), batch.advantages.tolist(), 1.5, 0.3, mode)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    lp.requires_grad_(True)
    est.loss(batch, plan, TokenLogps(lp))[0].backward()
    assert torch.isfinite(lp.grad).all()


def test_spg_block_plan_structure():
    bl, La = 4, 16
    lengths = [16, 5, 1, 9]
    batch = RolloutBatch(
        prompt_ids=torch.arange(12).view(4, 3) % 5, prompt_mask=torch.tensor([[0, 1, 1]] * 4),
        answer_ids=torch.ones(4, La, dtype=torch.long),
        answer_mask=torch.tensor([[1.0] * n + [0.0] * (La - n) for n in lengths]), advantages=torch.zeros(4),
    )
    est = build_estimator("spg", block_length=bl, num_t=2, p_mask_prompt=0.0)
    seen = [set() for _ in lengths]
    for plan in est.plan(batch, 40, torch.Generator().manual_seed(0)):
        assert plan.num_views == 2 and not plan.noise[:, :, :3].any()
        for v in range(2):
            for b, c in enumerate(lengths):
                ans = plan.noise[v, b, 3:].tolist()
                assert all(ans[c:])  # padding after the end token is always masked
                first = next(j for j in range(c) if ans[j])
                k = first // bl
                seen[b].add(k)
                assert k <= (c - 1) // bl
                assert all(ans[(k + 1) * bl:])
                n = min(bl, c - k * bl)
                assert 1 <= sum(ans[k * bl: k * bl + n]) <= n
                assert plan.score[v, b].sum().item() == sum(ans[:c])
    assert seen == [{0, 1, 2, 3}, {0, 1}, {0}, {0, 1, 2}]
    # SPG draws the views' blocks from one permutation: a full-length row gets distinct blocks.
    for plan in est.plan(batch, 20, torch.Generator().manual_seed(1)):
        firsts = [next(j for j in range(La) if plan.noise[v, 0, 3 + j]) // bl for v in range(2)]
        assert firsts[0] != firsts[1]
    # Context masking (SPG's p_mask_prompt): real prompt tokens and earlier blocks, never prompt padding.
    full = build_estimator("spg", block_length=bl, p_mask_prompt=1.0).plan(batch, 5, torch.Generator())
    for plan in full:
        assert plan.noise[:, :, 1:3].all() and not plan.noise[:, :, 0].any()


def _spg_full_row_batch(bl=4, La=16, lengths=(16, 16, 11, 16)):
    return RolloutBatch(
        prompt_ids=torch.arange(12).view(4, 3) % 5, prompt_mask=torch.tensor([[0, 1, 1]] * 4),
        answer_ids=torch.ones(4, La, dtype=torch.long),
        answer_mask=torch.tensor([[1.0] * n + [0.0] * (La - n) for n in lengths]), advantages=torch.zeros(4),
    )


def test_spg_masks_earlier_answer_blocks_as_context():
    """SPG's block_random masks the clean context, earlier answer blocks included, with p_mask_prompt.
    With p_mask_prompt = 1 and one token of block k masked (min_t = max_t = 0 gives m = 1), the only
    clean answer tokens are the other n_k - 1 of block k: every earlier block is masked."""
    bl, lengths = 4, (16, 16, 11, 16)
    batch = _spg_full_row_batch(bl, lengths=lengths)
    est = build_estimator("spg", block_length=bl, num_t=2, p_mask_prompt=1.0, min_t=0.0, max_t=0.0)
    ks = set()
    for plan in est.plan(batch, 30, torch.Generator().manual_seed(0)):
        for v in range(2):
            for b, c in enumerate(lengths):
                ans = plan.noise[v, b, 3:].tolist()
                clean = [j for j in range(16) if not ans[j]]
                k = clean[0] // bl if clean else (c - 1) // bl  # a one-token block is masked whole
                ks.add(k)
                n = min(bl, c - k * bl)
                assert len(clean) == n - 1 and all(j // bl == k for j in clean)
                assert all(ans[: k * bl])  # earlier blocks: context, masked with p_mask_prompt = 1
    assert {1, 2, 3} <= ks  # earlier blocks exist in many views
    # And with p_mask_prompt = 0 earlier blocks stay clean: the masking above is the context's.
    est0 = build_estimator("spg", block_length=bl, num_t=2, p_mask_prompt=0.0, min_t=0.0, max_t=0.0)
    for plan in est0.plan(batch, 10, torch.Generator().manual_seed(0)):
        for v in range(2):
            ans = plan.noise[v, 0, 3:].tolist()
            k = ans.index(True) // bl
            assert sum(ans[k * bl:(k + 1) * bl]) == 1 and not any(ans[: k * bl]) and all(ans[(k + 1) * bl:])


def test_spg_block_mask_count_reaches_the_whole_block():
    """m is uniform on [max(floor(n min_t), 1), min(floor(n max_t), n)], both ends included (SPG's
    torch.randint(start, end + 1)): with min_t 0 and max_t 1 a full block of 4 gets 1, 2, 3 and 4 masked
    tokens, and with min_t = max_t = 1 always the whole block."""
    bl = 4
    batch = _spg_full_row_batch(bl)
    counts = {b: set() for b in range(4)}
    est = build_estimator("spg", block_length=bl, num_t=2, p_mask_prompt=0.0)
    for plan in est.plan(batch, 60, torch.Generator().manual_seed(3)):
        for v in range(2):
            for b in range(4):
                ans = plan.noise[v, b, 3:].tolist()
                k = ans.index(True) // bl
                n = min(bl, int(batch.answer_mask[b].sum()) - k * bl)
                counts[b].add((n, sum(ans[k * bl: k * bl + n])))
    for b in (0, 1, 3):
        assert {m for n, m in counts[b] if n == 4} == {1, 2, 3, 4}
    whole = build_estimator("spg", block_length=bl, num_t=2, p_mask_prompt=0.0, min_t=1.0, max_t=1.0)
    for plan in whole.plan(batch, 10, torch.Generator().manual_seed(4)):
        for v in range(2):
            for b in range(4):
                ans = plan.noise[v, b, 3:].tolist()
                k = ans.index(True) // bl
                assert all(ans[k * bl:])  # the whole block k (and all after it) masked


# ---------------------------------------------------------------- configuration errors

@pytest.mark.parametrize("name, kwargs, key", [
    ("ppo", {}, "estimator"),
    ("unigrpo", {"eps": -0.1}, "eps"),
    ("unigrpo", {"beta": -1.0}, "beta"),
    ("unigrpo", {"kl": "k4"}, "kl"),
    ("diffu_grpo", {"aggregation": "seq_sum"}, "aggregation"),
    ("unigrpo", {"T": 0}, "T"),
    ("unigrpo", {"epsilon": 0.2}, "epsilon"),
    ("wd1", {"beta": 0.04}, "beta"),
    ("coupled_grpo", {"t_min": 0.0}, "t_min"),
    ("spg", {"logp_estimation": "zero"}, "logp_estimation"),
    ("spg", {"eubo_beta": 0.0}, "eubo_beta"),
])
def test_bad_config_raises(name, kwargs, key):
    with pytest.raises(ValueError, match=key):
        build_estimator(name, **kwargs)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("mu", [0, -1, 1.5])
def test_bad_mu_raises(name, mu):
    with pytest.raises(ValueError, match="mu"):
        build_estimator(name, **SIBLING_KW.get(name, {})).plan(make_batch(), mu)


def test_runtime_errors_name_the_key():
    batch = make_batch()
    with pytest.raises(ValueError, match="block_length"):
        build_estimator("spg", block_length=3).plan(batch, 1)
    with pytest.raises(ValueError, match="num_t"):
        build_estimator("spg", block_length=2, num_t=3).plan(batch, 1)
    est = build_estimator("unigrpo")
    plan = est.plan(batch, 1)[0]
    with pytest.raises(ValueError, match="mask_id"):
        est.token_logps(LookupLM(0), batch, plan)
    lp = TokenLogps(torch.zeros(1, 4, L))
    with pytest.raises(ValueError, match="ref"):
        est.loss(batch, plan, lp, lp, None)
    batch.advantages = None
    with pytest.raises(ValueError, match="advantages"):
        build_estimator("unigrpo", beta=0.0).loss(batch, plan, lp, lp)
    with pytest.raises(ValueError, match="r"):
        unigrpo_timesteps(1.5, 1000, 3)
