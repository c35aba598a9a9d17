"""MMaDA-8B's token layout and a CLIP ViT-L/14's shape, scaled down in width and depth only: the
same vocabulary (126,464 text tokens, mask id 126336, then 8,192 image codes), the same CLIP patch
and image size. One rollout of every mode, rewards (CLIP through the image tokenizer) and one
UniGRPO update, on random weights."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from rewards.worker import RewardWorker
from rl.advantages import group_advantages
from rl.data.tasks import make_rows
from rl.learner import Learner
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import BOS, END_HEADER, EOS, EOT, MASK, MULTIMODAL_TOKENS, START_HEADER, wrap
from rl.models.vq import VQConfig, VQImageTokenizer
from rollout.worker import RolloutWorker
from tests.test_learner import free_port

# Learner exports MASTER_ADDR/RANK/... for DeepSpeed (tests/conftest.py: restore_env).
pytestmark = pytest.mark.usefixtures("restore_env")

torch.set_num_threads(2)

TEXT_VOCAB, CODES, MASK_ID = 126464, 8192, 126336
# LLaDA-8B's special-token ids; the multimodal markers take reserved ids next to them.
SPECIAL_IDS = {BOS: 126080, EOS: 126081, MASK: MASK_ID, START_HEADER: 126346, END_HEADER: 126347, EOT: 126348,
               **{t: 126090 + i for i, t in enumerate(MULTIMODAL_TOKENS)}}


def llada_tokenizer():
    """A word-level tokenizer with LLaDA-8B's vocabulary size and special-token ids."""
    rows = make_rows("shapes_qa", 20) + make_rows("t2i", 20)
    words = sorted({w for r in rows for text in (r["prompt"], r.get("solution", "")) for w in text.replace("<", " <")
                    .replace(">", "> ").replace(",", " ").replace("?", " ").split()})
    vocab = {f"<unused{i}>": i for i in range(TEXT_VOCAB)}
    inverse = {i: t for t, i in vocab.items()}
    for token, i in [*SPECIAL_IDS.items(), *((w, 1000 + j) for j, w in enumerate(words))]:
        del vocab[inverse[i]]
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unused0>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_IDS))
    return wrap(tok)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_size")
    tok = llada_tokenizer()
    assert tok.mask_token_id == MASK_ID and len(tok) == TEXT_VOCAB
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64, rope_theta=500000.0,
                      vocab_size=TEXT_VOCAB + CODES, codebook_size=CODES, num_vq_tokens=16, mask_token_id=MASK_ID,
                      weight_tying=False, max_sequence_length=4096, bos_token_id=SPECIAL_IDS[BOS],
                      eos_token_id=SPECIAL_IDS[EOS], pad_token_id=SPECIAL_IDS[EOS])
    assert cfg.image_token_offset == TEXT_VOCAB
    LLaDAModelLM(cfg).save_pretrained(root / "mmada")
    tok.save_pretrained(root / "mmada")
    VQImageTokenizer(VQConfig(image_size=16, downsample=4, hidden=8, embed_dim=8, codebook_size=CODES)) \
        .save_pretrained(root / "vq")
    from tests.test_clip import save_vit_l14_shaped_clip
    save_vit_l14_shaped_clip(root / "clip")
    return root


def test_mmada_layout_one_rollout_rewards_and_update(dirs):
    rng = np.random.default_rng(0)
    rows = make_rows("shapes_qa", 1) + make_rows("t2i", 1)
    for r in rows:
        r["image_codes"] = rng.integers(0, CODES, 16).tolist()
    sampler = {"sampler": "fast", "gen_length": 16, "block_length": 8, "steps": 16, "temperature": 0.9,
               "image": {"steps": 4}}
    worker = RolloutWorker(str(dirs / "mmada"), sampler, threads=2)
    batch = worker.generate(rows, 2, seed=0)
    assert batch.answer_ids.shape == (4, 16)
    image_rows = [i for i, r in enumerate(batch.rows) if r["mode"] == "t2i"]
    assert image_rows == [2, 3] and all(0 <= c < CODES for i in image_rows for c in batch.images[i])
    assert (batch.answer_ids[2:] >= TEXT_VOCAB).all()

    rewards = RewardWorker([{"name": "math", "weight": 2.0, "tasks": ["shapes_qa"]},
                            {"name": "clip", "weight": 0.1, "key": "clip_score", "tasks": ["t2i"],
                             "kwargs": {"path": str(dirs / "clip")}}], ["math"], str(dirs / "vq"))
    scores = rewards.score([r["prompt"] for r in batch.rows], batch.completions, batch.rows, batch.images)
    clip = scores.components["clip_score"]
    assert np.isnan(clip[:2]).all() and np.isfinite(clip[2:]).all() and -100 <= min(clip[2:]) <= max(clip[2:]) <= 100

    batch.rewards = torch.tensor([1.0, 0.0, 0.3, 0.1])
    batch.advantages = group_advantages(batch.rewards, 2)
    learner = Learner(str(dirs / "mmada"), {"name": "unigrpo", "mu": 1, "beta": 0.04}, {"lr": 1e-3}, 0, rank=0,
                      world_size=1, master_port=free_port())
    try:
        before = learner.state_dict_for_rollout()
        metrics = learner.update(batch, 0)
        after = learner.state_dict_for_rollout()
    finally:
        learner.close()
    assert np.isfinite(metrics["pg_loss"]) and metrics["skipped_steps"] == 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    worker.load_weights(after)  # the updated policy goes back to the rollout worker unchanged in shape
