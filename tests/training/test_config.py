"""Every training flag is declared once, as a TrainConfig field, and the rest is derived from that declaration."""
import dataclasses

import pytest

from giseg.inference.spec import InferenceSpec, spec_flags
from giseg.training.config import PRESETS, TrainConfig, build_parser, parse_config, validate_config
from giseg.training.model_card import HYPER_PARAMETERS
from giseg.training.run_dir import MAY_CHANGE_ON_RESUME, RUN_IDENTITY
from giseg.utils.errors import UserError


def test_every_flag_has_help_a_section_and_an_identity_decision():
    """A flag added without help text, a --help section or a decision on whether a resume must keep it fails here."""
    for f in dataclasses.fields(TrainConfig):
        help_ = f.metadata.get("help")
        help_ = help_() if callable(help_) else help_
        assert isinstance(help_, str) and len(help_) >= 10, f"--{f.name}: no help text"
        assert isinstance(f.metadata.get("identity"), bool), f"--{f.name}: no identity decision (True or False)"
        assert f.metadata.get("group"), f"--{f.name}: no --help section (group)"


def test_the_resume_identity_and_the_card_table_are_derived_from_the_declaration():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(RUN_IDENTITY) == {n for n, f in fields.items() if f.metadata["identity"]} | {"world_size"}
    assert set(MAY_CHANGE_ON_RESUME) == {n for n, f in fields.items() if not f.metadata["identity"]}
    assert set(HYPER_PARAMETERS) == {n for n, f in fields.items() if f.metadata.get("card")}
    # what the README once listed by hand and had let drift: these two are part of a run's identity
    assert {"ema_decay", "empty_slice_fraction", "image_column", "case_column"} <= set(RUN_IDENTITY)


def test_the_inference_specs_flags_are_trainer_flags_with_the_specs_checks():
    """task, image_size, context_slices, context_stride: declared once, in the spec; the trainer has them with the
    same default and refuses what the spec would refuse, with the same words."""
    names = [f.name for f in spec_flags()]
    assert names[:4] == ["task", "image_size", "context_slices", "context_stride"]
    cfg = TrainConfig()
    for f in spec_flags():
        assert getattr(cfg, f.name) == f.metadata["flag"]["default"]
    with pytest.raises(UserError, match=r"--image_size must be a positive multiple of 32 \(the models downsample"):
        validate_config(TrainConfig(image_size=100))
    spec = InferenceSpec(dataset="gi", task="multilabel", classes=("a",), image_size=100, context_slices=1,
                         context_stride=2, mean=(0, 0, 0), std=(1, 1, 1), thresholds=(0.5,))
    assert spec.problems() == ["image_size: a positive multiple of 32 (the models downsample by 32), got 100"]


def test_a_preset_fills_only_the_flags_not_given():
    assert parse_config([]) == TrainConfig()
    demo = parse_config(["--preset", "demo"])
    assert {k: getattr(demo, k) for k in PRESETS["demo"]} == PRESETS["demo"]
    mine = parse_config(["--preset", "demo", "--epochs", "3"])
    assert mine.epochs == 3 and mine.lr == PRESETS["demo"]["lr"]
    with pytest.raises(UserError, match=r"--preset demo,nonsense: no preset .nonsense.; the presets: demo .* "
                                         r"giseg cv --preset competition"):
        parse_config(["--preset", "demo,nonsense"])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_combine_left_to_right_and_each_sets_only_real_flags(name):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(PRESETS[name]) <= set(fields) and PRESETS[name], name
    both = parse_config(["--preset", f"demo,{name}"])
    assert {k: getattr(both, k) for k in PRESETS[name]} == PRESETS[name]
    assert all(getattr(both, k) == v for k, v in PRESETS["demo"].items() if k not in PRESETS[name])
    validate_config(both)


def test_the_parser_has_one_option_per_field_in_its_section():
    parser = build_parser()
    options = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert options == {f.name for f in dataclasses.fields(TrainConfig)}
    titles = {g.title for g in parser._action_groups}
    assert {"model and data", "optimisation", "loss and metric", "running", "--dataset hf"} <= titles


def test_resume_run_takes_the_saved_settings_and_flags_given_win(tmp_path):
    import json

    run = tmp_path / "run"
    run.mkdir()
    saved = {**dataclasses.asdict(TrainConfig(image_size=64, lr=1e-3, epochs=5, output_dir=str(run))),
             "run_id": "x", "world_size": 1, "resolved": {}}
    (run / "run_config.json").write_text(json.dumps(saved))
    cfg = parse_config(["--resume_run", str(run), "--epochs", "9"])
    assert (cfg.image_size, cfg.lr, cfg.epochs) == (64, 1e-3, 9)
    assert cfg.output_dir == str(run) and cfg.resume_from_checkpoint == "latest"
    with pytest.raises(UserError, match="no readable run_config.json"):
        parse_config(["--resume_run", str(tmp_path / "nothing")])
    with pytest.raises(UserError, match="leave out --output_dir"):
        parse_config(["--resume_run", str(run), "--output_dir", str(tmp_path / "other")])
