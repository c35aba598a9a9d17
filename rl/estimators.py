"""Policy-gradient estimators and losses for masked diffusion LMs, one interface chosen by name.

A masked diffusion LM has no exact sequence likelihood, so every estimator here scores answer tokens
from a forward pass on a partly masked input. The estimators differ in how they mask (the plan) and
in how they turn per-token scores into a loss. Learner usage, once per rollout batch:

    est = build_estimator("unigrpo", eps=0.2, beta=0.04, kl="low_var_kl", aggregation="seq_mean_token_mean")
    plans = est.plan(batch, mu, generator)           # mu masked views, fixed for this rollout batch
    with torch.no_grad():
        # plan 0's old log-probs are its own policy pass's (old=None): nothing has changed yet
        old = [None] + [est.token_logps(policy, batch, p, mask_id) for p in plans[1:]] if est.needs_old else [None] * mu
        ref = [est.token_logps(ref_model, batch, p, mask_id) for p in plans] if est.needs_ref else [None] * mu
    for n in range(mu):
        logp = est.token_logps(policy, batch, plans[n], mask_id)      # grad flows
        loss, metrics = est.loss(batch, plans[n], logp, old[n], ref[n])

Because the plan fixes the masked input, policy, old and reference policies are scored on exactly the
same input, as UniGRPO and d1 require. Plans are built from `generator`, so a rollout batch's noise is
reproducible and each rollout batch gets fresh noise simply by the generator advancing.

The learner must keep the rows of a group together when it splits a batch (wd1 needs whole groups).
"""
from __future__ import annotations

import abc
import inspect
import math
from dataclasses import dataclass

import torch

from rl.batch import RolloutBatch
from rl.errors import fail
from rollout.sampler import uniform

KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
AGGREGATIONS = ("token_mean", "seq_mean_token_mean")
# verl clamps the log-ratio to this range so one runaway token cannot turn the loss into inf.
_MAX_LOG_RATIO = 20.0


def _require(ok: bool, key: str, expected: str, got) -> None:
    if not ok:
        fail(key, got, f"expected {expected}")


def _check_mu(mu) -> int:
    _require(isinstance(mu, int) and not isinstance(mu, bool) and mu >= 1, "mu", "an integer >= 1", mu)
    return mu


def _rand(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    # Plans are reproducible whatever device the batch lives on (see rollout.sampler.uniform).
    return uniform(shape, generator, device, torch.float32)


@dataclass
class MaskPlan:
    """The noising of one inner step: V masked views of the batch, run as one forward of V*B rows."""

    noise: torch.Tensor  # [V, B, P+L] bool, True = position replaced by the mask token
    score: torch.Tensor  # [V, B, L] bool, answer positions whose log-prob is read (masked and counted)
    t: float | None = None  # masking probability of this step (UniGRPO t_n/T, coupled-GRPO t)

    @property
    def num_views(self) -> int:
        return self.noise.shape[0]


@dataclass
class TokenLogps:
    """Per-view answer log-probs; 0 wherever the plan does not score a token."""

    logp: torch.Tensor  # [V, B, L] float32
    entropy: torch.Tensor | None = None  # [V, B, L] float32, detached; None when not computed


def _takes_logits_span(model) -> bool:
    params = inspect.signature(getattr(model, "forward", model)).parameters.values()
    return any(p.name == "logits_span" or p.kind is p.VAR_KEYWORD for p in params)


def _answer_logits(model, x: torch.Tensor, att: torch.Tensor, P: int, L: int) -> torch.Tensor:
    """Logits [rows, L, vocab] at the answer positions only.

    The prompt's logits are never read, so a model that takes logits_span (LLaDAModelLM, reached
    through wrappers that pass **kwargs on: DeepSpeed's engine, peft, the LoRA reference) runs its
    LM head on the L answer positions alone, instead of all P+L.
    """
    kw = {"logits_span": (P, P + L)} if _takes_logits_span(model) else {}
    logits = model(input_ids=x, attention_mask=att, **kw).logits
    # A model whose **kwargs swallow the span returns every position.
    return logits if logits.shape[1] == L else logits[:, P:]


def token_logps(
    model, batch: RolloutBatch, plan: MaskPlan, mask_id: int, entropy: bool | None = None
) -> TokenLogps:
    """One forward on the plan's masked inputs; float32 log p(answer token) at scored positions.

    Only the scored rows of the answer slice are cast to float32 and normalised, so no [B, T, V]
    float32 copy is made. Entropy (detached) defaults to being computed only on grad-enabled calls,
    i.e. the policy pass whose metrics are reported, not the no-grad old/ref passes.
    """
    V, B, T = plan.noise.shape
    P, L = batch.prompt_len, batch.answer_ids.shape[1]
    ids = batch.input_ids
    x = torch.where(plan.noise, torch.full_like(ids, mask_id), ids.unsqueeze(0)).reshape(V * B, T)
    att = batch.attention_mask.repeat(V, 1)
    logits = _answer_logits(model, x, att, P, L)  # [V*B, L, vocab]
    sel = plan.score.reshape(V * B, L)
    # Rows by index_select, not logits[sel]: the same values, but a boolean index's backward is an
    # accumulating index_put into a zero [V*B, L, vocab] tensor, which runs element by element on CPU.
    rows = sel.flatten().nonzero().squeeze(1)
    target = batch.answer_ids.repeat(V, 1).flatten().index_select(0, rows)
    picked = logits.flatten(0, 1).index_select(0, rows).float()  # [N, vocab]
    lse = torch.logsumexp(picked, dim=-1)
    lp = picked.gather(-1, target.unsqueeze(-1)).squeeze(-1) - lse
    out = torch.zeros(V * B, L, dtype=torch.float32, device=lp.device)
    out = out.masked_scatter(sel, lp)
    ent_out = None
    if entropy is None:
        entropy = torch.is_grad_enabled()
    if entropy:
        with torch.no_grad():
            ent = lse - (torch.softmax(picked, dim=-1) * picked).sum(-1)
            ent_out = torch.zeros_like(out).masked_scatter(sel, ent).view(V, B, L)
    return TokenLogps(out.view(V, B, L), ent_out)


K3_MAX = 10.0


def kl_penalty(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1/k2/k3).

    k3 = exp(ref - logp) - (ref - logp) - 1, unbounded, exactly as d1 (diffu_grpo_trainer.py) and
    DiffuCoder (coupled_grpo.py) compute it.
    low_var_kl is verl's bounded k3 (core_algos.kl_penalty): the log-ratio clamped to +-20, the value
    to at most K3_MAX. k3 grows as exp(ref - logp), so one token the policy has just pushed 10 nats
    below the reference (a junk continuation with a negative advantage) would otherwise outweigh the
    whole batch and spend the clipped gradient of an inner step on itself; the multimodal recipes
    needed the bound (docs/MULTIMODAL.md). Note verl spells this bounded form "k3" too; here k3 is
    the authors' plain form and the bound has its own name.
    """
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref) ** 2
    if kind == "k3":
        d = ref - logp
        return torch.exp(d) - d - 1
    if kind == "low_var_kl":
        d = (ref - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return (torch.exp(d) - d - 1).clamp(max=K3_MAX)
    raise ValueError(f"kl: expected one of {KL_ESTIMATORS}, got {kind!r}")


def aggregate(x: torch.Tensor, weight: torch.Tensor, mode: str) -> torch.Tensor:
    """Reduce per-token values [B, L] over counted tokens (weight 1) to a scalar.

    token_mean: sum over all counted tokens of the batch / their count (d1, DiffuCoder, verl default).
    seq_mean_token_mean: mean over rows of each row's token mean; rows with no counted token are
    left out of the mean instead of producing NaN. An empty batch gives 0, still on the graph.
    """
    w = weight.to(x.dtype)
    if mode == "token_mean":
        return (x * w).sum() / w.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        count = w.sum(-1)
        per_row = (x * w).sum(-1) / count.clamp(min=1)
        has = (count > 0).to(x.dtype)
        return (per_row * has).sum() / has.sum().clamp(min=1)
    raise ValueError(f"aggregation: expected one of {AGGREGATIONS}, got {mode!r}")


def _mean_entropy(logp: TokenLogps, plan: MaskPlan) -> float:
    if logp.entropy is None:
        return float("nan")
    s = plan.score.to(logp.entropy.dtype)
    return float((logp.entropy * s).sum() / s.sum().clamp(min=1))


def _advantages(batch: RolloutBatch) -> torch.Tensor:
    if batch.advantages is None:
        raise ValueError("batch.advantages: expected a [B] tensor (rl.advantages.group_advantages), got None")
    return batch.advantages.float()


def _valid(batch: RolloutBatch) -> torch.Tensor:
    return batch.answer_mask > 0


def _pack(prompt_noise: torch.Tensor, answer_noise: torch.Tensor) -> torch.Tensor:
    return torch.cat([prompt_noise, answer_noise], dim=-1)


def _maskable(batch: RolloutBatch) -> torch.Tensor:
    """Prompt positions a forward process may mask: real text tokens. Image features (ids < 0) are the
    condition, never noised, as in LLaDA-V's training."""
    return (batch.prompt_mask > 0) & (batch.prompt_ids >= 0)


def _d1_view(batch: RolloutBatch, p_mask_prompt: float, generator) -> MaskPlan:
    """d1's forward process: real prompt tokens masked with p, the whole answer masked.

    Left padding is never masked (d1 masks it too, but it is outside the attention mask here).
    """
    dev = batch.prompt_ids.device
    prompt_noise = (_rand(batch.prompt_ids.shape, generator, dev) < p_mask_prompt) & _maskable(batch)
    answer_noise = torch.ones_like(batch.answer_ids, dtype=torch.bool)
    return MaskPlan(_pack(prompt_noise, answer_noise)[None], _valid(batch)[None])


class Estimator(abc.ABC):
    """Interface shared by all estimators; see the module docstring for the learner loop."""

    name = ""
    needs_old = False
    needs_ref = False

    def __init__(self, mask_id: int | None = None):
        self.mask_id = mask_id

    @abc.abstractmethod
    def plan(self, batch: RolloutBatch, mu: int, generator: torch.Generator | None = None) -> list[MaskPlan]:
        """mu masked views, one per inner step, fixed for this rollout batch."""

    @abc.abstractmethod
    def loss(self, batch: RolloutBatch, plan: MaskPlan, logp: TokenLogps,
             old: TokenLogps | None = None, ref: TokenLogps | None = None) -> tuple[torch.Tensor, dict]:
        """Scalar loss to minimise and float metrics (pg_loss, pg_clipfrac, ppo_kl, kl_loss, entropy)."""

    def token_logps(self, model, batch: RolloutBatch, plan: MaskPlan, mask_id: int | None = None,
                    entropy: bool | None = None) -> TokenLogps:
        mask_id = self.mask_id if mask_id is None else mask_id
        _require(mask_id is not None, "mask_id",
                 "the model's mask token id (passed here or to build_estimator)", None)
        return token_logps(model, batch, plan, mask_id, entropy)


def _fresh_plans(make, batch: RolloutBatch, mu: int, generator) -> list[MaskPlan]:
    # A new draw per inner step, as d1/DiffuCoder/SPG with random_masking=True (one seed per iteration).
    return [make(batch, generator) for _ in range(_check_mu(mu))]


class ClippedGRPO(Estimator):
    """PPO-clipped GRPO loss on per-token log-prob estimates, plus beta * KL to the reference.

    Subclasses decide the masking (plan) and how view log-probs become one per-token estimate.
    """

    needs_old = True

    def __init__(self, eps: float, eps_high: float | None, beta: float, kl: str, aggregation: str,
                 mask_id: int | None = None):
        super().__init__(mask_id)
        _require(isinstance(eps, (int, float)) and eps >= 0, "eps", "a clip range >= 0", eps)
        eps_high = eps if eps_high is None else eps_high
        _require(isinstance(eps_high, (int, float)) and eps_high >= 0, "eps_high", "a clip range >= 0", eps_high)
        _require(isinstance(beta, (int, float)) and beta >= 0, "beta", "a KL coefficient >= 0", beta)
        _require(kl in KL_ESTIMATORS, "kl", f"one of {KL_ESTIMATORS}", kl)
        _require(aggregation in AGGREGATIONS, "aggregation", f"one of {AGGREGATIONS}", aggregation)
        self.eps, self.eps_high, self.beta = float(eps), float(eps_high), float(beta)
        self.kl, self.aggregation = kl, aggregation
        self.needs_ref = self.beta > 0

    def token_estimate(self, batch: RolloutBatch, plan: MaskPlan, logp: torch.Tensor):
        """(per-token log-prob estimate [B, L], counted-token weight [B, L]) from view log-probs [V, B, L]."""
        return logp[0], plan.score[0]

    def loss(self, batch, plan, logp, old=None, ref=None):
        new, weight = self.token_estimate(batch, plan, logp.logp)
        # old=None means on-policy (mu = 1, or the first inner step): the ratio is 1 but its gradient
        # is still the policy gradient.
        old_est = new.detach() if old is None else self.token_estimate(batch, plan, old.logp)[0]
        adv = _advantages(batch).unsqueeze(1)
        ratio = torch.exp((new - old_est).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        surr = ratio * adv
        surr_clipped = ratio.clamp(1 - self.eps, 1 + self.eps_high) * adv
        pg_loss = aggregate(-torch.minimum(surr, surr_clipped), weight, self.aggregation)
        loss, kl_loss = pg_loss, 0.0
        if self.beta > 0:
            _require(ref is not None, "ref", "reference log-probs (beta > 0)", ref)
            ref_est = self.token_estimate(batch, plan, ref.logp)[0]
            kl_term = aggregate(kl_penalty(new, ref_est, self.kl), weight, self.aggregation)
            loss = pg_loss + self.beta * kl_term
            kl_loss = float(kl_term.detach())
        with torch.no_grad():
            # verl's clipfrac: tokens where the clipped branch is the smaller one (its gradient is cut).
            clipfrac = aggregate((surr_clipped < surr).float(), weight, self.aggregation)
            ppo_kl = aggregate(old_est - new, weight, self.aggregation)
        metrics = {
            "pg_loss": float(pg_loss.detach()),
            "pg_clipfrac": float(clipfrac),
            "ppo_kl": float(ppo_kl),
            "kl_loss": kl_loss,
            "entropy": _mean_entropy(logp, plan),
        }
        return loss, metrics


def unigrpo_timesteps(r: float, T: int, mu: int) -> list[int]:
    """MMaDA Algorithm 1: t_1 = floor(r*T); t_n = floor((n-1)/(mu-1) * (T - t_1) + t_1), n = 2..mu.

    Integer arithmetic gives the exact floor (a float (n-1)/(mu-1) can land just under an integer).
    """
    _require(0.0 <= r <= 1.0, "r", "a number in [0, 1]", r)
    _require(isinstance(T, int) and T >= 1, "T", "an integer >= 1", T)
    _check_mu(mu)
    t1 = min(math.floor(r * T), T)
    return [t1] + [t1 + ((n - 1) * (T - t1)) // (mu - 1) for n in range(2, mu + 1)]


class UniGRPO(ClippedGRPO):
    """MMaDA's UniGRPO (section 2.3, Algorithm 1): structured answer-only noising, per-token ratio.

    One r ~ U(0,1) per rollout batch sets mu increasing timesteps; at step n every answer position is
    masked independently with probability t_n/T, the prompt never. Answer padding after the first end
    token is masked like any answer token (the sampler starts from a fully masked answer, so showing
    the end tokens would leak the answer length), but only counted tokens are scored. A row whose draw
    masks none of its counted tokens (always when t_1 = 0, which happens with probability 1/T) gets one
    uniformly chosen counted token masked, so every row contributes and the loss is never empty.
    Log-probs are read at masked counted positions only; the loss weights exactly those tokens.

    Normalisation, MMaDA eq. 5: J = 1/G sum_i 1/|o_i| sum_{t=1}^{|o_i|} (clipped term - beta KL), the
    mean over answers of each answer's token mean (aggregation="seq_mean_token_mean", the default).
    The paper defines the per-token likelihood pi'(o_{i,t}) with an indicator that o_{i,t} is masked,
    averages the sequence log-likelihood over the masked set M (1/|M| sum over M), and Algorithm 1
    (line 16) estimates log-probs "of masked tokens in o_i at t_n": the per-token terms exist only on
    masked tokens, so |o_i| here is the number of masked counted answer tokens of o_i at that inner
    step, the tokens the sum runs over, as in the paper's 1/|M|. (Read literally as the full answer
    length, |o_i| would scale each inner step's loss by its masking ratio t_n/T; the paper never says
    so.) aggregation="token_mean" pools all masked tokens of the batch instead (d1, DiffuCoder, verl).
    Defaults: eps 0.2 (PPO/verl), beta 0.04 (d1), kl "low_var_kl" (verl's bounded k3; the multimodal
    recipes needed the bound, docs/MULTIMODAL.md), seq_mean_token_mean (MMaDA eq. 5), T 1000 (MMaDA).
    """

    name = "unigrpo"

    def __init__(self, eps: float = 0.2, eps_high: float | None = None, beta: float = 0.04,
                 kl: str = "low_var_kl", aggregation: str = "seq_mean_token_mean", T: int = 1000,
                 mask_id: int | None = None):
        super().__init__(eps, eps_high, beta, kl, aggregation, mask_id)
        _require(isinstance(T, int) and not isinstance(T, bool) and T >= 1, "T", "an integer >= 1", T)
        self.T = T

    def plan(self, batch, mu, generator=None):
        mu = _check_mu(mu)
        r = float(_rand((), generator, "cpu"))
        return [self.masked_view(batch, t / self.T, generator) for t in unigrpo_timesteps(r, self.T, mu)]

    def masked_view(self, batch: RolloutBatch, p: float, generator=None) -> MaskPlan:
        """One UniGRPO inner-step view: each answer position masked with probability p, prompt clean."""
        dev = batch.answer_ids.device
        valid = _valid(batch)
        answer_noise = _rand(batch.answer_ids.shape, generator, dev) < p
        starved = valid.any(-1) & ~(answer_noise & valid).any(-1)
        # The valid position with the largest uniform key is a uniform choice among valid positions.
        pick = (_rand(batch.answer_ids.shape, generator, dev) * valid).argmax(-1)
        answer_noise[starved, pick[starved]] = True
        prompt_noise = torch.zeros_like(batch.prompt_ids, dtype=torch.bool)
        return MaskPlan(_pack(prompt_noise, answer_noise)[None], (answer_noise & valid)[None], t=p)


class DiffuGRPO(ClippedGRPO):
    """d1's diffu-GRPO: prompt masked with p_mask_prompt, answer fully masked, one-step mean-field
    log-prob of every counted answer token; a fresh prompt mask per inner step (random_masking=True).
    Defaults are d1's: eps 0.5, beta 0.04, k3 unbounded (as d1's code), p_mask_prompt 0.15, token_mean
    over counted tokens.
    """

    name = "diffu_grpo"

    def __init__(self, eps: float = 0.5, eps_high: float | None = None, beta: float = 0.04, kl: str = "k3",
                 aggregation: str = "token_mean", p_mask_prompt: float = 0.15, mask_id: int | None = None):
        super().__init__(eps, eps_high, beta, kl, aggregation, mask_id)
        _require(0.0 <= p_mask_prompt <= 1.0, "p_mask_prompt", "a probability in [0, 1]", p_mask_prompt)
        self.p_mask_prompt = float(p_mask_prompt)

    def plan(self, batch, mu, generator=None):
        return _fresh_plans(lambda b, g: _d1_view(b, self.p_mask_prompt, g), batch, mu, generator)


class CoupledGRPO(ClippedGRPO):
    """DiffuCoder's coupled-GRPO (apple/ml-diffucoder, src/open_r1/coupled_grpo.py).

    Per inner step one t ~ U[t_min, t_max] for the whole batch (their `random.uniform(0.2, 0.8)`) and
    one uniform draw u per answer position: view 1 masks u < t, view 2 its complement; with
    full_mask_view (their code always has it) view 0 masks the whole answer. The prompt is never
    masked. Per token, as their selective_log_softmax:
        logp = (logp_full + where(masked in view 1, logp_1 / t, logp_2 / (1 - t))) / 2
    (without the full view, just the coupled term). Old/ref/current all use this same combination,
    then the clipped GRPO loss over all counted tokens. Their Dream-based model shifts logits by one
    position; LLaDA predicts each position in place, so no shift here. Defaults from their
    config_coupled_code.yaml and trainer: eps 0.5, beta 0.01, k3 unbounded, token_mean. Their
    advantage is leave-one-out without std scaling (rl.advantages, adv_baseline: leave_one_out).
    """

    name = "coupled_grpo"

    def __init__(self, eps: float = 0.5, eps_high: float | None = None, beta: float = 0.01, kl: str = "k3",
                 aggregation: str = "token_mean", t_min: float = 0.2, t_max: float = 0.8,
                 full_mask_view: bool = True, mask_id: int | None = None):
        super().__init__(eps, eps_high, beta, kl, aggregation, mask_id)
        _require(0.0 < t_min <= t_max < 1.0, "t_min/t_max", "0 < t_min <= t_max < 1", (t_min, t_max))
        self.t_min, self.t_max, self.full_mask_view = float(t_min), float(t_max), bool(full_mask_view)

    def plan(self, batch, mu, generator=None):
        return _fresh_plans(self._coupled_views, batch, mu, generator)

    def _coupled_views(self, batch: RolloutBatch, generator) -> MaskPlan:
        dev = batch.answer_ids.device
        t = self.t_min + (self.t_max - self.t_min) * float(_rand((), generator, "cpu"))
        m1 = _rand(batch.answer_ids.shape, generator, dev) < t
        views = [m1, ~m1]
        if self.full_mask_view:
            views.insert(0, torch.ones_like(m1))
        valid = _valid(batch)
        prompt_noise = torch.zeros_like(batch.prompt_ids, dtype=torch.bool)
        noise = torch.stack([_pack(prompt_noise, v) for v in views])
        score = torch.stack([v & valid for v in views])
        return MaskPlan(noise, score, t=t)

    def token_estimate(self, batch, plan, logp):
        off = 1 if self.full_mask_view else 0
        m1 = plan.noise[off, :, batch.prompt_len:]
        coupled = torch.where(m1, logp[off] / plan.t, logp[off + 1] / (1 - plan.t))
        est = (logp[0] + coupled) / 2 if self.full_mask_view else coupled
        valid = _valid(batch)
        return est * valid, valid


class WD1(Estimator):
    """wd1 (xiaohangt/wd1, trainers/rev_grpo_trainer.py): ratio-free weighted likelihood.

    Sequence log-likelihood S_i = sum over counted answer tokens of d1's one-step log-prob (a sum,
    not a mean, as their code). Within each group of G answers:
        loss_g = -sum_i softmax(A/temperature)_i S_i + sum_i softmax(-A/temperature)_i S_i
    and the loss is the mean over groups (their per-device batch is exactly one group, averaged across
    devices). No old policy and no KL term (their ref-policy variant computes ref log-probs but never
    uses them). They train on mean-centred advantages (scale_by_std=False); softmax ignores the shift,
    so the weights are then softmax(r) within the group.
    """

    name = "wd1"

    def __init__(self, p_mask_prompt: float = 0.15, temperature: float = 1.0, mask_id: int | None = None):
        super().__init__(mask_id)
        _require(0.0 <= p_mask_prompt <= 1.0, "p_mask_prompt", "a probability in [0, 1]", p_mask_prompt)
        _require(temperature > 0, "temperature", "a value > 0", temperature)
        self.p_mask_prompt, self.temperature = float(p_mask_prompt), float(temperature)

    def plan(self, batch, mu, generator=None):
        return _fresh_plans(lambda b, g: _d1_view(b, self.p_mask_prompt, g), batch, mu, generator)

    def loss(self, batch, plan, logp, old=None, ref=None):
        G = batch.group_size
        _require(len(batch) % G == 0, "group_size", f"a divisor of the batch size {len(batch)}", G)
        seq = (logp.logp[0] * plan.score[0]).sum(-1).view(-1, G)
        adv = _advantages(batch).view(-1, G) / self.temperature
        weight = torch.softmax(-adv, dim=-1) - torch.softmax(adv, dim=-1)
        loss = (weight * seq).sum(-1).mean()
        metrics = {"pg_loss": float(loss.detach()), "pg_clipfrac": 0.0, "ppo_kl": 0.0, "kl_loss": 0.0,
                   "entropy": _mean_entropy(logp, plan)}
        return loss, metrics


class SPG(Estimator):
    """Sandwiched Policy Gradient (facebookresearch/SPG, spg/spg_trainer.py, forward_type block_random).

    Plan, per inner step, num_t views per row: view j takes block k = perm[j] mod (number of blocks
    holding counted tokens), perm a random permutation of all blocks (their code), mask every answer
    position after block k, and in block k a uniformly chosen number m in
    [max(floor(n*min_t), 1), min(floor(n*max_t), n)] of its n counted tokens; answer padding after
    the first end token is always masked; the clean context (real prompt tokens and answer blocks
    before k) is masked with p_mask_prompt, as their code does. Scored = masked and counted.

    Bounds, per row with c counted tokens and view j scoring s_j tokens:
      ELBO = mean_j (mean of logp over the tokens view j scores)
      EUBO = (1/eubo_beta) * mean over tokens scored in any view of
             log( mean_j [ p_j^eubo_beta * scored_j / (s_j / c) ] )
      mix  = mix_weight * EUBO + (1 - mix_weight) * ELBO
    Rows with A > 0 use the ELBO, the rest use logp_estimation (their reward_mask = A > 0). Loss:
      sum_i (-A_i * bound_i * c_i) / sum_i c_i
    No ratio, no old policy, no KL (SPG raises for beta != 0). They train on mean-centred advantages.
    The EUBO mean is taken in log space (logsumexp), which equals theirs without float underflow.
    Defaults from their GSM8K mix recipe: num_t 2, block_length 32, p_mask_prompt 0.15, mix 0.5,
    eubo_beta 1.5, min_t 0, max_t 1.
    """

    name = "spg"
    LOGP_ESTIMATIONS = ("elbo", "eubo", "mix")

    def __init__(self, block_length: int = 32, num_t: int = 2, p_mask_prompt: float = 0.15,
                 min_t: float = 0.0, max_t: float = 1.0, logp_estimation: str = "mix",
                 eubo_beta: float = 1.5, mix_weight: float = 0.5, mask_id: int | None = None):
        super().__init__(mask_id)
        _require(isinstance(block_length, int) and block_length >= 1, "block_length", "an integer >= 1",
                 block_length)
        _require(isinstance(num_t, int) and num_t >= 1, "num_t", "an integer >= 1", num_t)
        _require(0.0 <= p_mask_prompt <= 1.0, "p_mask_prompt", "a probability in [0, 1]", p_mask_prompt)
        _require(0.0 <= min_t <= max_t <= 1.0, "min_t/max_t", "0 <= min_t <= max_t <= 1", (min_t, max_t))
        _require(logp_estimation in self.LOGP_ESTIMATIONS, "logp_estimation",
                 f"one of {self.LOGP_ESTIMATIONS}", logp_estimation)
        _require(eubo_beta > 0, "eubo_beta", "a value > 0", eubo_beta)
        _require(0.0 <= mix_weight <= 1.0, "mix_weight", "a weight in [0, 1]", mix_weight)
        self.block_length, self.num_t, self.p_mask_prompt = block_length, num_t, float(p_mask_prompt)
        self.min_t, self.max_t = float(min_t), float(max_t)
        self.logp_estimation = logp_estimation
        self.eubo_beta, self.mix_weight = float(eubo_beta), float(mix_weight)

    def plan(self, batch, mu, generator=None):
        L, bl = batch.answer_ids.shape[1], self.block_length
        _require(L % bl == 0, "block_length", f"a divisor of the answer length {L}", bl)
        _require(self.num_t <= L // bl, "num_t", f"at most the number of blocks {L // bl}", self.num_t)
        return _fresh_plans(self._block_views, batch, mu, generator)

    def _block_views(self, batch: RolloutBatch, generator) -> MaskPlan:
        B, L = batch.answer_ids.shape
        c = _valid(batch).sum(-1)
        blocks = (c - 1).clamp(min=0) // self.block_length + 1
        # As SPG: the first num_t entries of a random permutation of all blocks, modulo the number
        # of blocks holding counted tokens (views of a full-length answer get distinct blocks).
        perm = _rand((B, L // self.block_length), generator, c.device).argsort(-1)
        ks = perm[:, : self.num_t] % blocks.unsqueeze(1)
        views = [self._block_view(batch, ks[:, j], generator) for j in range(self.num_t)]
        return MaskPlan(torch.stack([v[0] for v in views]), torch.stack([v[1] for v in views]))

    def _block_view(self, batch: RolloutBatch, k: torch.Tensor, generator):
        dev = batch.answer_ids.device
        B, L = batch.answer_ids.shape
        bl = self.block_length
        valid = _valid(batch)
        c = valid.sum(-1)
        start = (k * bl).unsqueeze(1)
        pos = torch.arange(L, device=dev).unsqueeze(0)
        in_block = (pos >= start) & (pos < start + bl)
        n = (c.unsqueeze(1) - start).clamp(0, bl).squeeze(1)
        lo = torch.floor(n * self.min_t).long().clamp(min=1)
        hi = torch.minimum(torch.floor(n * self.max_t).long(), n)
        hi = torch.maximum(hi, lo)
        m = (lo + (_rand((B,), generator, dev) * (hi - lo + 1)).long()).clamp(max=hi)
        # Rank block-k counted tokens by a uniform key (others sort last); the m lowest are masked.
        key = _rand((B, L), generator, dev).masked_fill(~(in_block & valid), 2.0)
        rank = key.argsort(-1).argsort(-1)
        answer_noise = (pos >= start + bl) | ((rank < m.unsqueeze(1)) & in_block & valid) | ~valid
        context_answer = pos < start
        p_ctx = self.p_mask_prompt
        answer_noise |= context_answer & (_rand((B, L), generator, dev) < p_ctx)
        prompt_noise = (_rand(batch.prompt_ids.shape, generator, dev) < p_ctx) & _maskable(batch)
        return _pack(prompt_noise, answer_noise), answer_noise & valid

    def bounds(self, batch: RolloutBatch, plan: MaskPlan, logp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row ELBO and EUBO estimates [B] from view log-probs [V, B, L]."""
        s = plan.score
        sf = s.to(logp.dtype)
        per_view = sf.sum(-1)  # [V, B]
        elbo = ((logp * sf).sum(-1) / per_view.clamp(min=1)).mean(0)
        c = _valid(batch).sum(-1).to(logp.dtype)
        emp_t = (per_view / c.clamp(min=1)).clamp(min=1e-8)
        log_terms = torch.where(s, self.eubo_beta * logp - emp_t.log().unsqueeze(-1), -math.inf)
        any_view = s.any(0)
        # Tokens no view scored get finite dummies: an all -inf logsumexp has a NaN gradient.
        log_terms = torch.where(any_view.unsqueeze(0), log_terms, 0.0)
        log_avg = torch.logsumexp(log_terms, dim=0) - math.log(s.shape[0])
        count = any_view.sum(-1).to(logp.dtype)
        eubo = torch.where(any_view, log_avg, 0.0).sum(-1) / count.clamp(min=1) / self.eubo_beta
        return {"elbo": elbo, "eubo": eubo}

    def loss(self, batch, plan, logp, old=None, ref=None):
        b = self.bounds(batch, plan, logp.logp)
        if self.logp_estimation == "mix":
            negative = self.mix_weight * b["eubo"] + (1 - self.mix_weight) * b["elbo"]
        else:
            negative = b[self.logp_estimation]
        adv = _advantages(batch)
        seq = torch.where(adv > 0, b["elbo"], negative)
        c = _valid(batch).sum(-1).to(seq.dtype)
        loss = (-adv * seq * c).sum() / c.sum().clamp(min=1)
        metrics = {"pg_loss": float(loss.detach()), "pg_clipfrac": 0.0, "ppo_kl": 0.0, "kl_loss": 0.0,
                   "entropy": _mean_entropy(logp, plan)}
        return loss, metrics


REGISTRY: dict[str, type[Estimator]] = {
    cls.name: cls for cls in (UniGRPO, DiffuGRPO, CoupledGRPO, WD1, SPG)
}


def build_estimator(name: str, **hyperparams) -> Estimator:
    """The estimator registered as `name`, with its hyperparameters checked (ValueError if unknown)."""
    if name not in REGISTRY:
        raise ValueError(f"estimator: expected one of {sorted(REGISTRY)}, got {name!r}")
    cls = REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown hyperparameter(s) {unknown}; expected some of {accepted}")
    return cls(**hyperparams)
