"""End-to-end: the multimodal recipes through the driver, with real Ray actors, the shipped tiny
multimodal model, VQ and CLIP."""
from functools import partial

import pytest

from rl.config import ConfigError
from rl.driver import Driver
from rl.tracking import read_metrics
from tests.conftest import compose_cfg

SMALL = ["trainer.total_steps=1", "trainer.prompts_per_step=3", "algorithm.group_size=2", "algorithm.mu=1",
         "trainer.val_every=1", "trainer.save_every=0", "ray.num_cpus=6", "rollout.image.steps=4"]

compose_cfg = partial(compose_cfg, base=SMALL)


@pytest.mark.slow
def test_unified_recipe_logs_every_task_and_saves_image_grids(local_ray, tmp_path):
    cfg = compose_cfg("recipe=unified_tiny", "task.train={arithmetic: 8, shapes_qa: 8, t2i: 8}",
                      "task.val={arithmetic: 2, shapes_qa: 2, t2i: 3}", "rollout.val_n=3")
    driver = Driver(cfg, tmp_path / "run")
    val_batches = []

    def generate(rows, group_size, seed, temperature=None):
        batch = Driver.generate(driver, rows, group_size, seed, temperature)
        if temperature is not None:  # evaluation passes the validation temperature
            val_batches.append((len(rows), len(batch.rows)))
        return batch

    driver.generate = generate
    try:
        driver.fit()
    finally:
        driver.close()
    assert val_batches == [(7, 21), (7, 21)]  # val_n answers per held-out prompt
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1]
    for m in metrics:
        for key in ("val/accuracy", "val/arithmetic/accuracy", "val/shapes_qa/accuracy", "val/t2i/clip_score",
                    "val/t2i/clip_score_reference"):
            assert key in m, key
        assert "val/t2i/accuracy" not in m  # no correctness reward applies to an image
        assert 0 < m["val/t2i/clip_score_reference"] <= 100
    assert metrics[0]["val/t2i/clip_score_reference"] == metrics[1]["val/t2i/clip_score_reference"]
    assert "reward/clip_score/mean" in metrics[1] and "actor/pg_loss" in metrics[1]
    grids = sorted(p.name for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert grids == ["step_000000.png", "step_000001.png"]
    assert (tmp_path / "run" / "samples" / grids[0]).read_bytes()[:4] == b"\x89PNG"
    from PIL import Image
    # One row of tiles (a 32 px image at scale 4 over its caption): one image per caption, not per answer.
    assert Image.open(tmp_path / "run" / "samples" / grids[0]).size[1] == 32 * 4 + 36 + 8


def test_real_size_configs_need_their_local_directories(tmp_path):
    cfg = compose_cfg("recipe=t2i_tiny", "model=mmada_8b")
    with pytest.raises(Exception, match="model.path"):
        Driver(cfg, tmp_path / "run")
    cfg = compose_cfg("recipe=t2i_tiny", "reward=t2i_clip_l14")
    with pytest.raises(Exception, match="clip_path"):
        Driver(cfg, tmp_path / "run")
    cfg = compose_cfg("recipe=t2i_tiny", f"model.image_tokenizer={tmp_path}/none")
    with pytest.raises(ConfigError, match=r"model.image_tokenizer=.*none"):
        Driver(cfg, tmp_path / "run")
