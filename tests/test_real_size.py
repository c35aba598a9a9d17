"""MMaDA-8B's token layout and a CLIP ViT-L/14's shape, scaled down in width and depth only: LLaDA-8B's
tokenizer ids (len 126,349, mask id 126336, MMaDA's markers at reserved ids 126084..126094), image code c
at 126,349 + c, 134,656 vocabulary rows (8,192 codes, then 115 unused), the same CLIP patch and image
size. MMaDA's ids, one rollout of every mode, rewards (CLIP through the image tokenizer) and one UniGRPO
update, on random weights."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from rewards.worker import RewardWorker
from rl.advantages import group_advantages
from rl.data.encode import encode_rows
from rl.data.tasks import make_rows
from rl.learner import Learner
from rl.models.llada import LLaDAConfig, LLaDAModelLM
from rl.models.tokenizer import (
    BOS,
    END_HEADER,
    EOS,
    EOT,
    MASK,
    START_HEADER,
    check_image_vocab,
    image_token_offset,
    multimodal_ids,
    wrap,
)
from rl.models.vq import VQConfig, VQImageTokenizer
from rollout.worker import RolloutWorker
from tests.test_learner import free_port

# Learner exports MASTER_ADDR/RANK/... for DeepSpeed (tests/conftest.py: restore_env).
pytestmark = pytest.mark.usefixtures("restore_env")

torch.set_num_threads(2)

# LLaDA-8B-Instruct's tokenizer: 126,080 BPE tokens, then 269 added ones (len 126,349). MMaDA-8B's
# vocabulary: 134,656 rows = LLaDA's 126,464 + 8,192 codes.
TEXT_VOCAB, CODES, VOCAB, MASK_ID = 126349, 8192, 134656, 126336
SPECIAL_IDS = {BOS: 126080, EOS: 126081, "[CLS]": 126082, "[gMASK]": 126083,
               **{f"<|reserved_token_{i}|>": 126084 + i for i in range(252)}, MASK: MASK_ID,
               **{f"<|reserved_token_{i}|>": 126337 + i - 253 for i in range(253, 256)},
               "<role>": 126340, "</role>": 126341, "<|arithmetic_start|>": 126342, "<|arithmetic_end|>": 126343,
               "<|number_start|>": 126344, "<|number_end|>": 126345, START_HEADER: 126346, END_HEADER: 126347,
               EOT: 126348}


def llada_tokenizer():
    """A word-level tokenizer with LLaDA-8B's length and special-token ids."""
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


def mmada_8b_config(**kw) -> LLaDAConfig:
    """MMaDA-8B's vocabulary and image sizes (config.json vocab_size 134,656, codebook 8,192) at toy width."""
    return LLaDAConfig(**{**dict(d_model=32, n_heads=2, n_kv_heads=2, n_layers=1, mlp_hidden_size=64,
                                 rope_theta=500000.0, vocab_size=VOCAB, codebook_size=CODES, num_vq_tokens=1024,
                                 mask_token_id=MASK_ID, weight_tying=False, max_sequence_length=4096,
                                 bos_token_id=SPECIAL_IDS[BOS], eos_token_id=SPECIAL_IDS[EOS],
                                 pad_token_id=SPECIAL_IDS[EOS]), **kw})


def test_mmada_8b_ids_with_llada_8b_tokenizer():
    """MMaDA's reserved_token_mapping (training/prompting_utils.py) and its `code + len(text_tokenizer)`."""
    tok = llada_tokenizer()
    assert len(tok) == 126349 and tok.mask_token_id == 126336
    ids = multimodal_ids(tok)
    assert ids == {"<|soi|>": 126084, "<|eoi|>": 126085, "<|sov|>": 126086, "<|eov|>": 126087, "<|t2i|>": 126088,
                   "<|mmu|>": 126089, "<|t2v|>": 126090, "<|v2v|>": 126091, "<|lvg|>": 126092, "[iPAD]": 126093,
                   "<|r2i|>": 126094}
    assert image_token_offset(tok) == 126349  # code c -> 126349 + c: codes 0..8191 at 126349..134540
    cfg = mmada_8b_config()
    check_image_vocab(cfg, tok, "MMaDA-8B")  # 134,656 rows hold 126,349 + 8,192 (115 unused after)
    with pytest.raises(ValueError, match=r"vocab_size=126464 .* len\(tokenizer\)=126349 \+ codebook_size=8192"):
        check_image_vocab(mmada_8b_config(vocab_size=126464), tok, "LLaDA-8B")
    qa, t2i = make_rows("shapes_qa", 1), make_rows("t2i", 1)
    qa[0]["image_codes"] = [0, 1, 8191]
    ids, mask = encode_rows(tok, qa + t2i, image_token_offset(tok))
    mmu = ids[0][mask[0].bool()].tolist()
    # app.py's mmu tab: [126089, 126084, vq + 126349, 126085, chat text], the chat text starting with BOS
    assert mmu[:6] == [126089, 126084, 126349, 126350, 134540, 126085]
    assert mmu[6:8] == [126080, 126346] and (mmu[-3], mmu[-1]) == (126346, 126347)  # user ... assistant header
    t2i_ids = ids[1][mask[1].bool()].tolist()  # <|t2i|> BOS caption EOS <|soi|>
    assert t2i_ids[:2] == [126088, 126080] and t2i_ids[-2:] == [126081, 126084]
    assert all(i < 126080 for i in t2i_ids[2:-2])


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_size")
    tok = llada_tokenizer()
    assert tok.mask_token_id == MASK_ID and len(tok) == TEXT_VOCAB
    torch.manual_seed(0)
    LLaDAModelLM(mmada_8b_config(num_vq_tokens=16)).save_pretrained(root / "mmada")
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
    assert (batch.answer_ids[:2] < TEXT_VOCAB).all()  # text: no image code, no unused row
    assert ((batch.answer_ids[2:] >= TEXT_VOCAB) & (batch.answer_ids[2:] < TEXT_VOCAB + CODES)).all()

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
