from giseg.commands.compare import main as compare_main
from giseg.training.config import TrainConfig
from giseg.training.loop import train


def test_compare_prints_one_row_per_run_with_params_and_dice(demo_dir, tiny_models, tmp_path, capsys):
    runs = []
    for name, model in [("seg", str(tiny_models["segformer"])), ("unet", "unet")]:
        out = tmp_path / name
        train(TrainConfig(base_model=model, data_dir=str(demo_dir), output_dir=str(out), image_size=64, epochs=2,
                          lr=2e-3, num_workers=0, n_folds=3, cache_dir=str(tmp_path / "c"),
                          early_stopping_patience=1, loss="focal" if name == "unet" else "bce_dice"))
        runs.append(str(out))
    (tmp_path / "not-a-run").mkdir()
    assert compare_main([*runs, str(tmp_path / "not-a-run")]) == 0
    captured = capsys.readouterr()
    assert f"left out {tmp_path / 'not-a-run'}: not a run (no run_config.json)" in captured.err
    table = [line for line in captured.out.splitlines() if line.startswith("|")]  # not the train logs
    assert table[0].startswith("| run | model |") and len(table) == 4
    body = "\n".join(table[2:])
    assert "| unet | unet |" in body and str(tiny_models["segformer"]) in body
    assert "M |" in body  # parameter counts read from the safetensors headers
    from giseg.evaluation.compare import count_parameters
    from giseg.models.load import load_model

    unet = load_model("unet", "multilabel", ("large_bowel", "small_bowel", "stomach")).model
    assert count_parameters(tmp_path / "unet" / "best") == sum(p.numel() for p in unet.parameters())  # no buffers


def test_compare_without_runs_is_an_error(tmp_path, capsys):
    assert compare_main([str(tmp_path)]) == 2
    assert "none of the given folders is a run" in capsys.readouterr().err
