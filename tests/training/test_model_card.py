"""Model cards in best/ and last/ (read back with huggingface_hub's ModelCard), and --push_to_hub offline."""
import json
import re

import pytest

from conftest import SEGMENTERS, base_model, log_events
from giseg.models.registry import FAMILIES as REGISTRY


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(card) -> dict:
    return {r.metric_name: r.metric_value for r in card.data.eval_results}


def test_best_and_last_cards_carry_the_figures_of_metrics_jsonl(tracked_run):
    from huggingface_hub import ModelCard

    records = _records(tracked_run)
    best = max(records, key=lambda r: r["dice_mean"])
    scores = json.loads((tracked_run / "val_scores.json").read_text())
    for tag, record in (("best", best), ("last", records[-1])):
        card = ModelCard.load(tracked_run / tag / "README.md")
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
        assert "segformer" in card.data.tags and card.data.base_model is None  # a local folder is no hub id
        got = _metrics(card)
        for c in ("large_bowel", "small_bowel", "stomach"):
            assert got[f"Dice {c}"] == pytest.approx(record[f"dice_{c}"], abs=1e-6)
        assert got["mean Dice"] == pytest.approx(record["dice_mean"], abs=1e-6)
        assert card.data.eval_results[0].dataset_split == "validation fold 0 of 3 (case-level, seed 42)"
        assert f"step {record['step']}" in card.text and "## Limits" in card.text and "three organs" in card.text
    score = [v for k, v in _metrics(ModelCard.load(tracked_run / "best" / "README.md")).items() if "score" in k]
    assert score == [pytest.approx(scores["score"], abs=1e-6)]  # best/ after --final_eval: the competition score


def test_the_cards_usage_code_runs_and_gives_masks_at_the_scan_size(tracked_run):
    text = (tracked_run / "best" / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert 'repo = "me/gi-test"' in code  # what users load after the push; here, the folder itself
    scope = {}
    exec(code.replace('"me/gi-test"', repr(str(tracked_run / "best"))), scope)
    assert tuple(scope["masks"].shape) == (3, 266, 266) and scope["masks"].dtype.is_floating_point is False


def test_a_hub_base_model_is_named_in_the_metadata(tracked_run):
    from huggingface_hub import ModelCard

    from giseg.inference.spec import InferenceSpec
    from giseg.training.model_card import card_text

    config = {**json.loads((tracked_run / "run_config.json").read_text()),
              "base_model": "nvidia/segformer-b0-finetuned-ade-512-512"}
    text = card_text(config=config, spec=InferenceSpec.load(tracked_run / "best"), record=_records(tracked_run)[-1],
                     family="segformer", split_sizes={"slices": 1, "cases": 1, "train": 1, "val": 1}, scores=None,
                     repo="me/x", what="best")
    card = ModelCard(text)
    assert card.data.base_model == "nvidia/segformer-b0-finetuned-ade-512-512"
    assert not [r for r in card.data.eval_results if "score" in r.metric_name]  # no --final_eval, no score


def test_push_to_hub_with_the_hub_unreachable_finishes_the_run_and_says_how_to_push_later(tracked_run):
    log = (tracked_run / "train.log").read_text()
    lines = [line for line in log_events(log) if "push to the Hub failed" in line]
    assert len(lines) == 1 and f"hf upload me/gi-test {tracked_run / 'best'} ." in lines[0]
    assert "Traceback" not in log and (tracked_run / "best" / "model.safetensors").is_file()
    assert "done:" in log and " INFO final eval | case | slices |" in log and "final eval | |" not in log


def test_push_to_hub_without_a_repo_id_is_refused_at_the_start():
    from giseg.training.config import TrainConfig, validate_config
    from giseg.utils.errors import UserError

    with pytest.raises(UserError, match="--push_to_hub needs --hub_model_id"):
        validate_config(TrainConfig(push_to_hub=True))


@pytest.fixture(scope="module")
def card_code_runs(tiny_models, fresh_python, tmp_path_factory) -> dict:
    """Each family's best/ folder with its card, and the card's usage code run in a fresh interpreter (none of our
    modules imported beforehand: tests/fresh_python.py)."""
    import dataclasses

    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import load_model, save_model
    from giseg.training.config import TrainConfig
    from giseg.training.model_card import card_text

    classes, codes = ("large_bowel", "small_bowel", "stomach"), {}
    for family in SEGMENTERS:
        tmp_path = tmp_path_factory.mktemp(family)
        base = base_model(family, tiny_models, tmp_path)
        loaded = load_model(base, "multilabel", classes)
        spec = InferenceSpec(dataset="gi", task="multilabel", classes=classes, image_size=64, context_slices=1,
                             context_stride=2, mean=loaded.mean, std=loaded.std, thresholds=(0.5,) * 3,
                             patch_size="32,64,64" if REGISTRY[family].kind == "volume" else "")
        folder = tmp_path / "best"
        config = dataclasses.asdict(TrainConfig(base_model=base, output_dir=str(tmp_path), image_size=64))
        card = card_text(config=config, spec=spec, record={"step": 1, "epoch": 1}, family=loaded.family,
                         split_sizes={"slices": 1, "cases": 1, "train": 1, "val": 1}, scores=None,
                         repo=str(folder), what="best")
        save_model(loaded.model, folder, spec, card=card)
        code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
        codes[family] = code + "\nprint('MASKS', tuple(masks.shape), masks.dtype)"
    from conftest import ROOT

    return {family: fresh_python.run(code, cwd=ROOT, timeout=120) for family, code in codes.items()}


@pytest.mark.parametrize("family", SEGMENTERS)
def test_the_cards_usage_code_loads_the_folder_for_every_family(family, card_code_runs):
    """Each family's card shows code that loads its own folder: run in a fresh interpreter (so nothing this test
    process registered helps it), it must give masks at the scan's size. The CNN baselines' model types (gi_unet,
    gi_unext) need their registration import, Mask2Former the toolkit's query post-processing, a 3D model the
    toolkit's sliding window over a volume."""
    res = card_code_runs[family]
    assert res.returncode == 0, res.stderr[-2000:]
    shape = {"mask2former": "(1, 3, 266, 266)", "volume": "(40, 3, 266, 266)"}.get(
        "volume" if REGISTRY[family].kind == "volume" else family, "(3, 266, 266)")
    assert f"MASKS {shape} torch.bool" in res.stdout
