"""The fast sampler: exact when its techniques are off, and each technique doing what it claims."""
from dataclasses import replace

import pytest
import torch

from rl.data.encode import decode_answers, encode_prompts
from rl.data.tasks import make_rows
from rl.models import TINY_CHECKPOINT, load_checkpoint
from rl.models.tokenizer import end_token_ids
from rollout.fast import FastSamplerConfig, finished_rows, generate_fast, parallel_count
from rollout.rollout import rollout, sampler_config
from rollout.sampler import SamplerConfig, answer_mask, generate

OFF = dict(cache="none", threshold=None, early_stop=False, share_prompt=False)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    model, tok = load_checkpoint(TINY_CHECKPOINT)
    rows = make_rows("arithmetic", 16, 0, "val")
    ids, mask = encode_prompts(tok, [r["prompt"] for r in rows])
    return model.eval(), tok, ids, mask


GREEDY64 = dict(gen_length=64, block_length=32, steps=64, temperature=0.0)


@pytest.fixture(scope="module")
def ref64(tiny):
    return run_ref(tiny, SamplerConfig(**GREEDY64))


def run_fast(tiny, cfg, seed=0, ids=None, mask=None):
    model, tok, ids0, mask0 = tiny
    ids, mask = (ids0, mask0) if ids is None else (ids, mask)
    return generate_fast(model, ids, mask, tok.mask_token_id, cfg, torch.Generator().manual_seed(seed),
                         end_ids=end_token_ids(tok), fill_id=tok.eos_token_id)


def run_ref(tiny, cfg, seed=0):
    model, tok, ids, mask = tiny
    return generate(model, ids, mask, tok.mask_token_id, cfg, torch.Generator().manual_seed(seed))


def texts(tiny, out):
    tok = tiny[1]
    return decode_answers(tok, out.answer_ids, end_token_ids(tok))


@pytest.mark.parametrize("steps,temperature,cfg_scale", [(64, 0.9, 0.0), (16, 0.0, 0.0), (16, 0.9, 1.0)])
def test_everything_off_is_the_reference_token_for_token(tiny, steps, temperature, cfg_scale):
    base = dict(gen_length=64, block_length=32, steps=steps, temperature=temperature, cfg_scale=cfg_scale)
    ref = run_ref(tiny, SamplerConfig(**base))
    fast = run_fast(tiny, FastSamplerConfig(**base, **OFF))
    assert torch.equal(fast.answer_ids, ref.answer_ids)
    assert torch.equal(fast.commit_step, ref.commit_step)
    assert fast.forward_passes == ref.forward_passes == steps
    assert torch.equal(fast.tokens_per_step, ref.tokens_per_step)


def test_early_stop_and_shared_prompts_keep_greedy_answers_and_cut_the_work(tiny):
    model, tok, ids, mask = tiny
    G = 4
    ids, mask = ids[:3].repeat_interleave(G, 0), mask[:3].repeat_interleave(G, 0)  # rollout's group layout
    base = dict(gen_length=96, block_length=32, steps=96, temperature=0.0)
    ref = generate(model, ids, mask, tok.mask_token_id, SamplerConfig(**base))
    fast = run_fast(tiny, FastSamplerConfig(**base, **{**OFF, "early_stop": True, "share_prompt": True}),
                    ids=ids, mask=mask)
    ends = end_token_ids(tok)
    keep = answer_mask(ref.answer_ids, ends).bool()
    # Up to and including the first end token the answers are the reference's; after it, end-of-text.
    assert torch.equal(fast.answer_ids[keep], ref.answer_ids[keep])
    assert (fast.answer_ids[~keep] == tok.eos_token_id).all()
    assert (fast.commit_step >= 0).all()
    assert (fast.sampled < 96).all() and (fast.row_steps < 96).all()  # every row ended early here
    # Rows left the batch and the first pass ran once per distinct prompt.
    P = ids.shape[1]
    assert fast.row_tokens < ref.row_tokens / 2
    no_share = run_fast(tiny, FastSamplerConfig(**base, **{**OFF, "early_stop": True}), ids=ids, mask=mask)
    assert torch.equal(no_share.answer_ids, fast.answer_ids)
    assert no_share.row_tokens - fast.row_tokens == (len(ids) - 3) * (P + 96)


def test_parallel_decoding_commits_several_tokens_per_step_and_stays_close(tiny, ref64):
    ref = ref64
    for rule in (dict(threshold=0.9), dict(threshold=None, factor=1.0)):
        fast = run_fast(tiny, FastSamplerConfig(**GREEDY64, **{**OFF, **rule}))
        assert fast.forward_passes < ref.forward_passes / 2
        assert float(fast.tokens_per_step.mean()) > 2
        assert (fast.commit_step >= 0).all()
        same = sum(a == b for a, b in zip(texts(tiny, fast), texts(tiny, ref)))
        assert same >= 14, (rule, same)  # of 16: confident commits rarely change a greedy answer


@pytest.mark.parametrize("cache,work", [("prefix", 0.6), ("dual", 0.4)])
def test_cached_sampler_differs_from_the_reference_within_a_bound(tiny, ref64, cache, work):
    """The cache is approximate (stale keys until the next block start). With 1 token per step the
    only difference from the reference is the cache; bound how often it changes an answer."""
    ref = ref64
    fast = run_fast(tiny, FastSamplerConfig(**GREEDY64, **{**OFF, "cache": cache}))
    assert fast.forward_passes == ref.forward_passes
    # Only the block (dual) or the block and what follows it (prefix) is recomputed between refreshes.
    assert fast.row_tokens < work * ref.row_tokens
    keep = answer_mask(ref.answer_ids, end_token_ids(tiny[1])).bool()
    token_agreement = (fast.answer_ids == ref.answer_ids)[keep].float().mean()
    same = sum(a == b for a, b in zip(texts(tiny, fast), texts(tiny, ref)))
    assert token_agreement >= 0.7 and same >= 6, (token_agreement, same)
    # A fresh cache at every step would be exact: at block starts the cached pass is the full pass.
    first_block = (ref.commit_step == 0)
    assert torch.equal(fast.answer_ids[first_block], ref.answer_ids[first_block])


def test_cache_with_guidance_and_early_stop_runs_the_doubled_batch(tiny):
    cfg = FastSamplerConfig(gen_length=64, block_length=32, steps=64, temperature=0.9, cfg_scale=1.0)
    out = run_fast(tiny, cfg)
    assert out.answer_ids.shape == (16, 64) and (out.answer_ids != tiny[1].mask_token_id).all()


def test_parallel_count_threshold_and_factor_rules():
    inf = float("inf")
    conf = torch.tensor([[0.95, 0.5, 0.92, -inf], [0.3, 0.2, -inf, -inf], [-inf, -inf, -inf, -inf]])
    assert parallel_count(conf, 0.9, None).tolist() == [2, 1, 0]  # at least one where any mask is left
    # factor 1: the n-th most confident needs c >= 1 - 1/(n+1): 0.5, 0.667, 0.75, 0.8
    conf = torch.tensor([[0.99, 0.8, 0.6, 0.9], [0.4, 0.3, -inf, -inf]])
    assert parallel_count(conf, None, 1.0).tolist() == [3, 1]  # ranked 0.99, 0.9, 0.8 pass; 0.6 < 0.8 stops


def test_finished_rows_need_an_end_with_nothing_masked_before_it():
    M, E = 9, 1
    answers = torch.tensor([[5, E, M, M], [M, E, 5, M], [5, 5, 5, 5], [5, 5, E, 6]])
    assert finished_rows(answers, M, torch.tensor([E])).tolist() == [True, False, False, True]


def test_bad_settings_fail_with_the_key():
    with pytest.raises(ValueError, match="sampler.threshold"):
        FastSamplerConfig(threshold=1.5)
    with pytest.raises(ValueError, match="not both"):
        FastSamplerConfig(threshold=0.9, factor=1.0)
    with pytest.raises(ValueError, match="sampler.cache"):
        FastSamplerConfig(cache="kv")
    with pytest.raises(ValueError, match="early_stop"):
        generate_fast(None, torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2), 9, FastSamplerConfig())
    with pytest.raises(ValueError, match="takes no \\['cache'\\]"):
        sampler_config({"sampler": "reference", "cache": "dual"})
    with pytest.raises(ValueError, match="rollout.sampler='turbo'"):
        sampler_config({"sampler": "turbo"})
    assert isinstance(sampler_config({"sampler": "fast", "num_workers": 2, "threshold": None}), FastSamplerConfig)


def test_rollout_with_the_fast_sampler_reports_tokens_per_step(tiny):
    model, tok = tiny[:2]
    rows = make_rows("arithmetic", 4, 1, "val")
    cfg = FastSamplerConfig(gen_length=32, block_length=16, steps=16, temperature=0.9)
    batch = rollout(model, tok, rows, 4, cfg, torch.Generator().manual_seed(0))
    tps = batch.tokens_per_step
    assert tps.shape == (16,) and (tps >= 1).all()
    assert (batch.commit_step >= 0).all()
    ref = rollout(model, tok, rows, 4, replace(SamplerConfig(), gen_length=32, block_length=16, steps=16), None)
    assert torch.equal(ref.tokens_per_step, torch.full((16,), 2.0))
