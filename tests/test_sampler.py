import math
from types import SimpleNamespace

import pytest
import torch

from rollout.sampler import SamplerConfig, answer_mask, generate, guided_logits, sample_tokens, transfer_schedule

MASK, V = 9, 12


class LookupModel(torch.nn.Module):
    """Answer position j predicts target[j] with logit conf[j] (everything else 0); records its calls."""

    def __init__(self, target, conf, mask_logit=0.0):
        super().__init__()
        self.target, self.conf, self.mask_logit, self.calls = target, conf, mask_logit, []

    def forward(self, input_ids, attention_mask, logits_span=None):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        B, T = input_ids.shape
        L = len(self.target)
        logits = torch.zeros(B, T, V)
        logits[:, T - L:].scatter_(-1, self.target.expand(B, L)[..., None], self.conf.expand(B, L)[..., None])
        logits[..., MASK] = self.mask_logit
        lo, hi = logits_span or (0, T)
        return SimpleNamespace(logits=logits[:, lo:hi])


def prompt(B=1, P=3):
    return torch.ones(B, P, dtype=torch.long), torch.ones(B, P, dtype=torch.long)


def test_transfer_schedule_spreads_remainder_first():
    assert transfer_schedule(torch.tensor([10, 4, 0]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 1], [0, 0, 0, 0]]


def test_greedy_low_confidence_commits_blockwise_most_confident_first():
    target = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8])
    conf = torch.tensor([1.0, 4.0, 2.0, 3.0, 8.0, 5.0, 7.0, 6.0])
    model = LookupModel(target, conf, mask_logit=100.0)  # mask's own logit must be ignored
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=4)
    out = generate(model, *prompt(), MASK, cfg)
    assert out.answer_ids.tolist() == [target.tolist()]
    # Two blocks x two steps, two commits per step, higher confidence first, block 0 before block 1.
    assert out.commit_step.tolist() == [[1, 0, 1, 0, 2, 3, 2, 3]]
    assert out.forward_passes == 4 and len(model.calls) == 4
    # Later blocks stay masked while an earlier block is being decoded.
    first_input = model.calls[0][0][0, 3:]
    assert (first_input == MASK).all()
    second_block_start = model.calls[2][0][0, 3:]
    assert second_block_start[:4].tolist() == [1, 2, 3, 4] and (second_block_start[4:] == MASK).all()


def test_one_token_per_step_commits_each_token_once():
    target, conf = torch.arange(1, 7), torch.tensor([3.0, 1.0, 2.0, 6.0, 5.0, 4.0])
    out = generate(LookupModel(target, conf), *prompt(), MASK, SamplerConfig(gen_length=6, block_length=3, steps=6))
    assert sorted(out.commit_step[0].tolist()) == list(range(6))
    assert out.commit_step.tolist() == [[0, 2, 1, 3, 4, 5]]


def test_random_remasking_and_padding_are_respected():
    target, conf = torch.arange(1, 9), torch.ones(8)
    model = LookupModel(target, conf)
    ids = torch.tensor([[0, 0, 5], [4, 5, 6]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    cfg = SamplerConfig(gen_length=8, block_length=8, steps=4, remasking="random", temperature=0.0)
    out = generate(model, ids, mask, MASK, cfg, torch.Generator().manual_seed(0))
    assert out.answer_ids.tolist() == [target.tolist()] * 2
    for x, att in model.calls:
        assert x[:, :3].tolist() == ids.tolist()  # prompt and padding never touched
        assert att.tolist() == [[0, 0, 1] + [1] * 8, [1] * 11]
    assert (out.commit_step.sort(-1).values == torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])).all()


def test_gumbel_max_matches_tempered_softmax():
    logits = torch.log(torch.tensor([1.0, 2.0, 3.0])).expand(60000, 3)
    gen = torch.Generator().manual_seed(0)
    for temp in (1.0, 0.5):
        counts = torch.bincount(sample_tokens(logits, temp, gen), minlength=3).double() / 60000
        expected = torch.softmax(logits[0].double() / temp, -1)
        assert torch.allclose(counts, expected, atol=0.01), (temp, counts, expected)
    assert sample_tokens(logits[:2], 0.0, gen).tolist() == [2, 2]


def test_temperature_sampling_is_reproducible_by_seed():
    torch.manual_seed(0)
    target, conf = torch.arange(1, 9), torch.full((8,), 0.5)
    cfg = SamplerConfig(gen_length=8, block_length=4, steps=8, temperature=1.0)
    runs = [generate(LookupModel(target, conf), *prompt(4), MASK, cfg, torch.Generator().manual_seed(s)).answer_ids
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert not (runs[0] == MASK).any()


def test_classifier_free_guidance_formula():
    class PromptSensitive(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            seen = (input_ids[:, :2] != MASK).all(1).float()  # 1 = conditional row
            logits = torch.zeros(*input_ids.shape, V)
            logits[..., 0] = 1.0 + 2.0 * seen[:, None]
            return SimpleNamespace(logits=logits)

    x = torch.tensor([[1, 1, MASK, MASK]])
    prompt_pos = torch.tensor([[True, True, False, False]])
    out = guided_logits(PromptSensitive(), x, torch.ones_like(x), prompt_pos, MASK, cfg_scale=1.5)
    # uncond 1, cond 3: 1 + 2.5 * (3 - 1) = 6
    assert math.isclose(out[0, 2, 0].item(), 6.0)


def test_answer_mask_stops_after_first_end_token():
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [3, 2, 2, 2, 2]])
    assert answer_mask(ids, [2, 3]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("kw,key", [
    (dict(gen_length=10, block_length=4), "block_length"), (dict(steps=3), "steps"), (dict(steps=128), "steps"),
    (dict(temperature=-1.0), "temperature"), (dict(remasking="topk"), "remasking"), (dict(cfg_scale=-0.5), "cfg_scale"),
])
def test_bad_sampler_config(kw, key):
    with pytest.raises(ValueError, match=f"sampler.{key}="):
        SamplerConfig(**{**dict(gen_length=64, block_length=32, steps=64), **kw})
