import json

from bench.learning import main


def test_learning_summary_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "val/accuracy": 0.25},
            {"step": 1, "timing_s/step": 10.0, "timing_s/gen": 6.0, "val/accuracy": 0.75},
            {"step": 2, "timing_s/step": 12.0, "timing_s/gen": 6.0, "val/accuracy": 0.5}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = main([str(run), "--plot", str(tmp_path / "c.png")])[str(run)]
    assert out["gain"] == 0.25 and out["best_gain"] == 0.5
    assert out["curve"][-1] == {"step": 2, "train_seconds": 22.0, "val_accuracy": 0.5}
    assert out["median_step_seconds"] == 12.0 and out["median_gen_share"] == 0.6
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out)[str(run)]["gain"] == 0.25


def test_clustered_se_splits_prompt_and_answer_variance():
    from bench.learning import clustered_se

    # per-prompt accuracies 1, 0, .5, .5: var of the means 1/6, within 0.25 (unbiased), between 1/6 - 0.25/2
    out = clustered_se([[1, 1], [0, 0], [1, 0], [0, 1]])
    assert out["accuracy"] == 0.5 and out["se_points"] == round(100 * (1 / 6 / 4) ** 0.5, 2)
    assert out["var_within"] == 0.25 and out["var_between"] == round(1 / 6 - 0.125, 4)
    assert out["se_points_by_design"]["128x1"] == round(100 * ((1 / 6 - 0.125 + 0.25) / 128) ** 0.5, 2)
    # prompts that are always right or always wrong: all of the variance is between prompts
    assert clustered_se([[1, 1, 1], [0, 0, 0]])["var_within"] == 0.0
