"""LLaDA-V as an RL policy: image rows in, continuous features once per prompt, every sampler and estimator
unchanged (rl/data/encode.py encode_image_prompts, rollout/rollout.py WithImages, rl/learner.py)."""
import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from rl.batch import IMAGE_NEWLINE, RolloutBatch
from rl.config import ConfigError, validate
from rl.data.encode import IMAGE, encode_image_prompts, image_prompt
from rl.data.loader import attach_pixels, load_split
from rl.models import load_checkpoint
from rl.models.llada_v import LLaDAVModelLM
from rl.models.tokenizer import train_tokenizer
from rollout.fast import FastSamplerConfig
from rollout.rollout import rollout
from rollout.sampler import SamplerConfig
from tests.conftest import compose_cfg
from tests.test_llada_v import TINY, tiny_model, write_published

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("restore_env")


@pytest.fixture(scope="module")
def vdir(tmp_path_factory):
    """A tiny random LLaDA-V folder (32 px images, 16 features each, image_newline after each image)."""
    path = tmp_path_factory.mktemp("llada-v-rl")
    tok = train_tokenizer(["How many shapes are there? <think>red circle</think><answer>2</answer>",
                           "Ann has 12 apples and gets 3 more."] * 3, vocab_size=300)
    model = tiny_model(vocab_size=len(tok), mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, system_prompt="Look closely.",
                       image_aspect_ratio="square")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def scene_rows(n):
    from rl.data.tasks import make_rows
    return make_rows("shapes_qa", n, seed=0, split="val")


def counting_calls(model):
    calls = []
    model.vision_model.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((args[0] if args else kwargs["pixel_values"]).shape[0]),
        with_kwargs=True)
    return calls


def test_image_prompts_place_each_prompts_images_once(vdir):
    model, tok = load_checkpoint(vdir)
    rows = attach_pixels(scene_rows(2), 32, "t")
    expanded = [r for r in rows for _ in range(3)]  # G = 3 answers share one row dict
    ids, mask, pixels = encode_image_prompts(tok, expanded, model.image_placeholder_ids, "Look closely.")
    assert pixels.shape == (2, 32, 32, 3) and pixels.dtype == torch.uint8
    assert torch.equal(pixels[1], torch.from_numpy(rows[1]["pixels"][0]))
    for i, row in enumerate(expanded):
        real = ids[i][mask[i] > 0].tolist()
        image = i // 3
        start = real.index(-(1 + image * model.tokens_per_image))
        assert real[start:start + model.positions_per_image] == model.image_placeholder_ids(image)
        # LLaDA-V's layout: system turn, then the user turn opening with <image>\n, split and tokenized apart
        text = tok.apply_chat_template([{"role": "system", "content": "Look closely."},
                                        {"role": "user", "content": IMAGE + "\n" + row["prompt"]}],
                                       add_generation_prompt=True, tokenize=False)
        before, after = text.split(IMAGE)
        assert real[:start] == tok(before, add_special_tokens=False)["input_ids"]
        assert real[start + model.positions_per_image:] == tok(after, add_special_tokens=False)["input_ids"]


def test_image_placeholders_must_match_the_images():
    row = {"prompt": f"{IMAGE} left, {IMAGE} right: which is bigger?", "pixels": [np.zeros((4, 4, 3), np.uint8)]}
    with pytest.raises(ValueError, match="row 3: the prompt has 2 <image> placeholder.*1 image"):
        image_prompt(row, "row 3")
    msgs = image_prompt({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                         "pixels": [np.zeros((4, 4, 3), np.uint8)] * 2})
    assert msgs[1]["content"] == f"{IMAGE}\n{IMAGE}\nq" and msgs[0]["content"] == "s"


def test_concat_renumbers_the_image_table_and_select_keeps_it():
    def part(n_images, tokens=2):
        ids = [[5, *[-(1 + i * tokens + t) for t in range(tokens)], IMAGE_NEWLINE, 6] for i in range(n_images)]
        ids = torch.tensor(ids)
        return RolloutBatch(prompt_ids=ids, prompt_mask=torch.ones_like(ids), answer_ids=torch.zeros(n_images, 2,
                            dtype=torch.long), answer_mask=torch.ones(n_images, 2),
                            pixels=torch.arange(n_images, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 2, 3),
                            image_tokens=tokens)
    text = part(1)
    text = replace(text, prompt_ids=torch.tensor([[5, 7, 7, 7, 6]]), pixels=None, image_tokens=0)
    joined = RolloutBatch.concat([part(2), text, part(1)], pad_id=0)
    assert joined.pixels.shape[0] == 3 and joined.image_tokens == 2
    assert joined.prompt_ids[:, 1:3].tolist() == [[-1, -2], [-3, -4], [7, 7], [-5, -6]]
    assert (joined.prompt_ids[[0, 1, 3], 3] == IMAGE_NEWLINE).all()
    assert joined.pixels[2, 0, 0, 0] == 0  # the third part's image, after the first part's two
    assert joined.select(slice(3, 4)).pixels.shape[0] == 3  # the table stays whole


def test_a_shard_keeps_only_the_images_its_prompts_show():
    tokens = 2
    ids = torch.tensor([[5, *[-(1 + i * tokens + t) for t in range(tokens)], IMAGE_NEWLINE] for i in range(3)])
    pixels = torch.arange(3, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 2, 2, 3)
    batch = RolloutBatch(prompt_ids=ids, prompt_mask=torch.ones_like(ids), answer_ids=torch.zeros(3, 2,
                         dtype=torch.long), answer_mask=torch.ones(3, 2), pixels=pixels, image_tokens=tokens)
    part = batch.select(slice(2, 3)).own_images()
    assert part.pixels.shape[0] == 1 and part.pixels[0, 0, 0, 0] == 2
    assert part.prompt_ids.tolist() == [[5, -1, -2, IMAGE_NEWLINE]]
    assert batch.own_images().prompt_ids.tolist() == batch.prompt_ids.tolist()


@pytest.mark.parametrize("sampler", ["reference", "fast"])
def test_rollout_runs_the_tower_once_per_prompt_and_conditions_on_it(vdir, sampler):
    model, tok = load_checkpoint(vdir)
    calls = counting_calls(model)
    rows = attach_pixels(scene_rows(3), 32, "t")
    cfg = (SamplerConfig(gen_length=8, block_length=4, steps=8, temperature=0.0) if sampler == "reference" else
           FastSamplerConfig(gen_length=8, block_length=4, steps=8, temperature=0.0, cache="dual"))
    batch = rollout(model, tok, rows, 4, cfg, torch.Generator().manual_seed(0), micro_batch=5)
    assert calls == [3]  # one tower pass over the 3 prompts' images, for 12 answers in 3 micro-batches
    assert batch.pixels.shape[0] == 3 and batch.image_tokens == model.tokens_per_image
    assert (batch.prompt_ids < 0).sum(1).tolist() == [model.positions_per_image] * 12
    # the answers depend on the image: other pixels give other greedy answers
    other = [dict(r, pixels=[255 - r["pixels"][0]]) for r in rows]
    again = rollout(model, tok, other, 4, cfg, torch.Generator().manual_seed(0), micro_batch=5)
    assert not torch.equal(batch.answer_ids, again.answer_ids)


def test_fast_sampler_without_cache_reproduces_the_reference_on_llada_v(vdir):
    model, tok = load_checkpoint(vdir)
    rows = attach_pixels(scene_rows(4), 32, "t")
    ref = SamplerConfig(gen_length=8, block_length=4, steps=8, temperature=0.7)
    fast = FastSamplerConfig(gen_length=8, block_length=4, steps=8, temperature=0.7, cache="none",
                             threshold=None, early_stop=False)
    a = rollout(model, tok, rows, 2, ref, torch.Generator().manual_seed(3))
    b = rollout(model, tok, rows, 2, fast, torch.Generator().manual_seed(3))
    assert torch.equal(a.answer_ids, b.answer_ids)


def test_learner_runs_the_tower_once_per_update_for_every_pass(vdir):
    from rl.advantages import group_advantages
    from rl.learner import Learner
    from tests.test_learner import OPTIM, UNIGRPO, free_port

    model, tok = load_checkpoint(vdir)
    rows = attach_pixels(scene_rows(2), 32, "t")
    batch = rollout(model, tok, rows, 4, SamplerConfig(gen_length=8, block_length=4, steps=4, temperature=1.0),
                    torch.Generator().manual_seed(0))
    batch.rewards = torch.tensor([1.0, 0, 0, 1, 0, 1, 1, 0])
    batch.advantages = group_advantages(batch.rewards, 4)
    lrn = Learner(str(vdir), {**UNIGRPO, "mu": 2}, OPTIM, 0, rank=0, world_size=1, master_port=free_port(),
                  micro_batch=4)
    try:
        calls = counting_calls(lrn.module)
        before = {k: v.clone() for k, v in lrn.module.state_dict().items()}
        metrics = lrn.update(batch, seed=0)
        assert calls == [2]  # 2 prompts' images, once, for mu=2 inner steps x (old, ref, policy) x 2 chunks
        after = lrn.module.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(k.startswith("model.mm_projector.") for k in changed)
        assert any(k.startswith("model.layers.") for k in changed)
        assert not any("vision_tower" in k for k in changed)  # frozen
        assert metrics["skipped_steps"] == 0
    finally:
        lrn.close()


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def png_bytes(size=(20, 12)):
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_rows_from_files(vdir, tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(png_bytes())
    rows = attach_pixels([{"prompt": "q", "image": str(good)},
                          {"prompt": f"{IMAGE} vs {IMAGE}", "images": [{"bytes": png_bytes(), "path": None},
                                                                       str(good)]},
                          {"prompt": "text only"}], 32, "f")
    assert [len(r.get("pixels", [])) for r in rows] == [1, 2, 0]
    assert rows[0]["pixels"][0].shape == (32, 32, 3) and rows[0]["pixels"][0].dtype == np.uint8
    assert tuple(rows[1]["pixels"][0][5, 5]) == (200, 10, 10)  # resized, colours kept


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "image": "nowhere.png"}, r"data.jsonl: row 1 image 0: image file .*nowhere.png.* does not exist"),
    ({"prompt": "q", "images": ["CORRUPT"]}, r"row 1 image 0: cannot read the image"),
    ({"prompt": "q", "images": [[[1, 2], [3, 4]]]}, r"row 1 image 0: expected uint8 pixels \[H, W, 3\]"),
    ({"prompt": f"{IMAGE} and {IMAGE}?", "image": "GOOD"}, r"row 1: the prompt has 2 <image> placeholder"),
    ({"prompt": f"{IMAGE} what?"}, r"row 1: the prompt has 1 <image> placeholder\(s\) but the row has 0"),
    ({"prompt": "draw a cat", "mode": "t2i", "scene": {}}, r"row 1 is a text-to-image row"),
])
def test_bad_image_rows_fail_in_the_config_check_naming_the_row(vdir, tmp_path, row, message):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    row = json.loads(json.dumps(row).replace("GOOD", str(good)).replace("CORRUPT", str(corrupt)))
    data = write_rows(tmp_path / "data.jsonl", [{"prompt": "fine", "answer": "1", "image": str(good)},
                                                {"answer": "2", **row}])
    cfg = compose_cfg(f"model.path={vdir}", f"task.train_file={data}", f"task.val_file={data}",
                      "reward=text_reasoning")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_task_rows_come_with_pixels_for_llada_v(vdir):
    rows = load_split({"train": {"shapes_qa": 4}}, "train", 0, model_dir=str(vdir))
    assert all(len(r["pixels"]) == 1 and r["pixels"][0].shape == (32, 32, 3) for r in rows)
    text = load_split({"train": {"arithmetic": 2}}, "train", 0, model_dir=str(vdir))
    assert not any("pixels" in r for r in text)


@pytest.mark.slow
def test_llada_v_trains_through_the_driver(local_ray, vdir, tmp_path):
    from rl.driver import Driver
    from rl.tracking import read_metrics

    small = ["trainer.total_steps=2", "trainer.prompts_per_step=2", "algorithm.group_size=2", "algorithm.mu=2",
             "trainer.val_every=1", "trainer.save_every=1", "ray.num_cpus=6"]
    cfg = compose_cfg("recipe=llada_v_tiny", f"model.path={vdir}", "task.train={shapes_qa: 8}",
                      "task.val={shapes_qa: 4}", "rollout.gen_length=8", "rollout.steps=8", "rollout.block_length=8",
                      base=small)
    driver = Driver(cfg, tmp_path / "run")
    try:
        driver.fit()
    finally:
        driver.close()
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "val/shapes_qa/accuracy" in metrics[-1] and "actor/pg_loss" in metrics[1]
    saved = LLaDAVModelLM.from_pretrained(tmp_path / "run" / "checkpoints" / "global_step_2" / "actor" / "hf")
    assert saved.config.model_type == "llava_llada"
    assert TINY["mm_projector_type"] == saved.config.mm_projector_type


def test_config_overrides_load_the_published_layout_everywhere(tmp_path):
    """GSAI-ML/LLaDA-V's anyres_max_4 is refused by name; model.config_overrides={image_aspect_ratio: square}
    makes the config check, the rollout worker and the learner load it."""
    from rl.learner import Learner
    from rollout.worker import RolloutWorker
    from tests.test_learner import OPTIM, UNIGRPO, free_port

    path, _ = write_published(tmp_path)
    base = [f"model.path={path}", "task=shapes_qa", "task.train={shapes_qa: 4}", "task.val={shapes_qa: 2}"]
    with pytest.raises(ConfigError, match=r"model.path: .*config.json.*image_aspect_ratio='anyres_max_4'"):
        validate(compose_cfg(*base, base=[]))
    validate(compose_cfg(*base, "model.config_overrides={image_aspect_ratio: square}", base=[]))
    with pytest.raises(ConfigError, match=r"model.config_overrides.image_aspect_ratio='pad': expected square"):
        validate(compose_cfg(*base, "model.config_overrides={image_aspect_ratio: pad}", base=[]))
    worker = RolloutWorker(str(path), {"sampler": "reference", "gen_length": 4, "block_length": 4, "steps": 4},
                           config_overrides={"image_aspect_ratio": "pad"})
    assert worker.model.config.image_aspect_ratio == "pad"
    lrn = Learner(str(path), UNIGRPO, OPTIM, 0, rank=0, world_size=1, master_port=free_port(),
                  config_overrides={"image_aspect_ratio": "pad"})
    try:
        assert lrn.module.config.image_aspect_ratio == "pad" and lrn.ref.config.image_aspect_ratio == "pad"
    finally:
        lrn.close()


def test_verl_multimodal_parquet_rows_reach_the_tower(vdir, tmp_path):
    """verl's multimodal parquet (geometry3k's layout): a chat prompt with <image>, the images as
    list<struct<bytes, path>>, the answer in reward_model.ground_truth."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "data_source": ["hiyouga/geometry3k"] * 2,
        "prompt": [[{"role": "user", "content": f"{IMAGE}Find x."}], [{"role": "user", "content": "No image: 2+2?"}]],
        "images": [[{"bytes": png_bytes(), "path": None}], []],
        "ability": ["math", "math"],
        "reward_model": [{"ground_truth": "3", "style": "rule"}, {"ground_truth": "4", "style": "rule"}],
    })
    pq.write_table(table, tmp_path / "train.parquet")
    rows = load_split({"train_file": str(tmp_path / "train.parquet")}, "train", 0, model_dir=str(vdir))
    assert rows[0]["answer"] == "3" and len(rows[0]["pixels"]) == 1 and "pixels" not in rows[1]
    model, tok = load_checkpoint(vdir)
    batch = rollout(model, tok, rows, 2, SamplerConfig(gen_length=4, block_length=4, steps=4, temperature=0.0))
    assert batch.pixels.shape[0] == 1 and (batch.prompt_ids[:2] < 0).any() and not (batch.prompt_ids[2:] < 0).any()
