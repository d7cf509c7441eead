"""The inference spec saved with every model is read back strictly; the Segmenter turns logits into masks
and prepares raw scans exactly as the decode-once cache and the data set do."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from giseg.inference.spec import SPEC_FILE, InferenceSpec
from giseg.inference.segmenter import Segmenter, masks_from_logits
from giseg.utils.errors import UserError

SPEC = InferenceSpec(dataset="gi", task="multilabel", classes=("large_bowel", "small_bowel", "stomach"),
                     image_size=64, context_slices=3, context_stride=2, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                     thresholds=(0.5, 0.4, 0.5))


def test_spec_round_trips_through_its_file(tmp_path):
    SPEC.save(tmp_path)
    assert InferenceSpec.load(tmp_path) == SPEC
    assert json.loads((tmp_path / SPEC_FILE).read_text())["thresholds"] == [0.5, 0.4, 0.5]


@pytest.mark.parametrize("change, message", [
    (dict(image_size=100), "image_size: a positive multiple of 32 (the models downsample by 32), got 100"),
    (dict(context_slices=2), "context_slices: an odd number >= 1 (1, 3, 5 ...), got 2"),
    (dict(context_slices=5), "mean: 5 numbers (one per input channel) in [-1000, 1000]"),
    (dict(thresholds=(0.5, 0.5)), "thresholds: 3 value(s) in (0, 1)"),
    (dict(thresholds=(0.5, 1.5, 0.5)), "thresholds: 3 value(s) in (0, 1)"),
    (dict(task="multiclass"), "thresholds: 0 value(s) in (0, 1) for task multiclass"),
    (dict(task="panoptic"), "task: one of"),
    (dict(std=(1, 0, 1)), "std: 3 numbers (one per input channel) in [0.001, 1000]"),
    (dict(std=(1, 1e-30, 1)), "std: 3 numbers (one per input channel) in [0.001, 1000]"),
    (dict(std=(1, float("inf"), 1)), "std: 3 numbers"),
    (dict(mean=(0.5, float("nan"), 0.5)), "mean: 3 numbers"),
    (dict(mean=(0.5, "0.5", 0.5)), "mean: 3 numbers"),
    (dict(thresholds=(0.5, "0.4", 0.5)), "thresholds: 3 value(s) in (0, 1)"),
    (dict(thresholds=(0.5, float("nan"), 0.5)), "thresholds: 3 value(s) in (0, 1)"),
    (dict(image_size="64"), "image_size: a positive multiple of 32"),
    (dict(min_area=(0.1, "x", 0.1)), "min_area: null or one per class"),
    (dict(classes=("large_bowel", "../../x", "stomach")), "classes: class name '../../x' cannot be used"),
    (dict(classes=("large_bowel", "", "stomach")), "classes: class name '' cannot be used"),
    (dict(classes=("stomach", "small_bowel", "stomach")), "classes: class names must be distinct"),
    (dict(mean="0.5"), "mean: a list, got '0.5'"),
    (dict(min_area=(0.1, 0.1)), "min_area: null or one per class, fractions in [0, 1)"),
    (dict(min_prob=(0.5, 1.0, 0.5)), "min_prob: null or one per class, values in [0, 1)"),
    (dict(postprocess=("largest", "none", "smallest")), "postprocess: null or one per class, one of"),
    (dict(postprocess=("largest", "none", "min:0")), "postprocess: null or one per class, one of"),
])
def test_a_value_out_of_range_is_refused_naming_it(tmp_path, change, message):
    (tmp_path / SPEC_FILE).write_text(json.dumps({**dataclasses.asdict(SPEC), **change}))
    with pytest.raises(UserError, match=re.escape(f"{SPEC_FILE}: {message}")):
        InferenceSpec.load(tmp_path)


def test_a_missing_or_unknown_key_is_refused(tmp_path):
    raw = dataclasses.asdict(SPEC)
    del raw["context_stride"]
    (tmp_path / SPEC_FILE).write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(UserError, match=r"missing \['context_stride'\], unknown \['colour'\]"):
        InferenceSpec.load(tmp_path)


def test_a_folder_without_a_spec_is_refused_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "segformer", "id2label": {"0": "a"}}))
    with pytest.raises(UserError) as err:
        InferenceSpec.load(tmp_path)
    assert "no inference_spec.json" in str(err.value) and "gi_task missing" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_folder_of_the_previous_version_still_loads(tmp_path):
    """Before the spec file, the trainer saved gi_* config attributes and a preprocessor config."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "segformer", "id2label": {"0": "background", "1": "large_bowel", "2": "small_bowel",
                                                "3": "stomach"},
        "gi_task": "multiclass", "gi_dataset": "gi", "gi_context_slices": 3, "gi_context_stride": 2}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"height": 96, "width": 96}, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    spec = InferenceSpec.load(tmp_path)
    assert spec == InferenceSpec("gi", "multiclass", ("large_bowel", "small_bowel", "stomach"), 96, 3, 2,
                                 (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), ())


def test_masks_use_per_class_thresholds_or_argmax_and_the_requested_size():
    logits = torch.logit(torch.tensor([0.9, 0.2, 0.45])).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    ml = masks_from_logits(logits, (4, 4), "multilabel", torch.tensor([0.5, 0.5, 0.4]))
    assert ml.shape == (1, 3, 4, 4) and ml[0, :, 0, 0].tolist() == [True, False, True]
    mc = torch.tensor([0.1, 0.2, 3.0, 0.1]).view(1, 4, 1, 1)  # background + 3 classes; argmax is class 2
    assert masks_from_logits(mc, (1, 1), "multiclass", None).flatten().tolist() == [False, True, False]


def test_logits_are_upsampled_before_the_threshold():
    """Between a confident +8 and a -2, the upsampled logit crosses 0 at 4/5 of the way; probabilities (0.9997,
    0.12) would cross 0.5 earlier: the mask follows the logits, as the loss does."""
    logits = torch.tensor([8.0, -2.0]).view(1, 1, 1, 2)
    up = masks_from_logits(logits, (1, 10), "multilabel", torch.tensor([0.5]))[0, 0, 0]
    expected = torch.nn.functional.interpolate(logits, size=(1, 10), mode="bilinear", align_corners=False)[0, 0, 0] > 0
    assert up.tolist() == expected.tolist() and up.sum() > 5


def test_prepare_gives_the_input_of_the_cached_pipeline(demo_dir, tmp_path):
    """What the app feeds the model for a raw scan equals what the data set makes of the cached slice."""
    from giseg.data.registry import DATASETS
    from giseg.data.cache import build_cache
    from giseg.data.gi import build_index
    from giseg.data.volumes import neighbour_table
    from giseg.data.dataset import SliceDataset

    index = build_index(demo_dir)
    cache = build_cache(DATASETS["gi"], index, 64, tmp_path)
    nb = neighbour_table(index, 3, 2)
    ds = SliceDataset(cache, np.arange(len(index)), nb, None, SPEC.mean, SPEC.std)
    segmenter = Segmenter(torch.nn.Linear(1, 1), SPEC)
    raws = [DATASETS["gi"].read_image(index.iloc[k]) for k in nb[5]]
    torch.testing.assert_close(segmenter.prepare(raws)[0], ds[5]["pixel_values"], rtol=0, atol=0)


def _model_folder(tiny, out, image_size: int, seed: int, context: int = 1):
    """A model folder as the trainer writes it (new random head for the GI classes), untrained."""
    from giseg.data.gi import GI_CLASSES
    from giseg.models.load import load_model, save_model

    torch.manual_seed(seed)
    loaded = load_model(str(tiny), "multilabel", GI_CLASSES)
    spec = InferenceSpec(dataset="gi", task="multilabel", classes=GI_CLASSES, image_size=image_size,
                         context_slices=context, context_stride=2, mean=loaded.mean, std=loaded.std,
                         thresholds=(0.5,) * 3, split={"n_folds": 3, "fold": 0, "split_seed": 42})
    save_model(loaded.model, out, spec)
    return out


@pytest.fixture(scope="module")
def two_models(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    return (_model_folder(tiny_models["segformer"], root / "a", 64, 1),
            _model_folder(tiny_models["upernet"], root / "b", 96, 2, context=3))


def test_an_ensemble_of_two_models_averages_their_probabilities(demo_dir, two_models, tmp_path):
    from giseg.data.registry import DATASETS
    from giseg.data.gi import build_index
    from giseg.inference.ensemble import Ensemble

    index = build_index(demo_dir)
    rows = np.arange(8)
    ens = Ensemble.load(list(two_models), weights=[1.0, 3.0])
    inputs = ens.inputs(DATASETS["gi"], index, tmp_path)  # each its own size (64, 96) and context (1, 3)
    assert [c.images.shape[-1] for c, _ in inputs] == [64, 96] and [nb.shape[1] for _, nb in inputs] == [1, 3]
    alone = [dict(m.iter_probabilities(index, rows, c, nb)) for m, (c, nb) in zip(ens.members, inputs)]
    got = dict(ens.iter_probabilities(index, rows, inputs))
    assert list(got) == list(rows)
    for r in rows:
        assert got[r].shape == (3, index.at[r, "height"], index.at[r, "width"])
        np.testing.assert_allclose(got[r], 0.25 * alone[0][r] + 0.75 * alone[1][r], rtol=0, atol=1e-6)
        assert not np.allclose(alone[0][r], alone[1][r])


def test_one_model_through_the_ensemble_gives_the_segmenters_own_masks(demo_dir, two_models, tmp_path):
    from giseg.data.registry import DATASETS
    from giseg.data.gi import build_index
    from giseg.inference.ensemble import Ensemble

    index = build_index(demo_dir)
    rows = np.arange(len(index))
    ens = Ensemble.load([two_models[0]])
    (cache, nb), = ens.inputs(DATASETS["gi"], index, tmp_path)
    direct = dict(ens.members[0].iter_masks(index, rows, cache, nb))
    via = dict(ens.iter_masks(index, rows, [(cache, nb)], ("case", "day")))
    assert all(np.array_equal(direct[r], via[r]) for r in rows)
    post = dict(ens.with_decisions(postprocess=("largest",) * 3).iter_masks(index, rows, [(cache, nb)],
                                                                           ("case", "day")))
    assert list(post) == list(rows) and all(post[r].sum() <= via[r].sum() for r in rows)


def test_an_ensemble_refuses_models_of_other_classes_and_wrong_weights(two_models, tmp_path):
    from giseg.inference.ensemble import Ensemble

    a = Segmenter.load(two_models[0])
    other = Segmenter(a.model, dataclasses.replace(a.spec, classes=("x", "y", "z")))
    with pytest.raises(UserError, match="cannot be averaged"):
        Ensemble([a, other])
    with pytest.raises(UserError, match="--weights needs 2 positive values"):
        Ensemble([a, a], weights=[1.0, -1.0])
    with pytest.raises(UserError, match="--weights needs 2 positive values"):
        Ensemble([a, a], weights=[float("inf"), 1.0])
    with pytest.raises(UserError, match="--weights needs 2 positive values"):
        Ensemble([a, a], weights=[float("nan"), 1.0])
    reduced = Segmenter(a.model, dataclasses.replace(a.spec, dataset_options={"reduce_labels": True}))
    with pytest.raises(UserError, match="read its data with other options"):
        Ensemble([a, reduced])


def _edit_spec(folder, tmp_path, **change):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    raw = json.loads((out / SPEC_FILE).read_text())
    (out / SPEC_FILE).write_text(json.dumps({**raw, **change}))
    return out


@pytest.mark.parametrize("change, message", [
    (dict(classes=["small_bowel", "large_bowel", "stomach"]),
     r"labels \['small_bowel', 'large_bowel', 'stomach'\] \(multilabel\) are not the model's own \['large_bowel', "
     r"'small_bowel', 'stomach'\]"),
    (dict(task="multiclass", thresholds=[]), r"labels \['background', .*\(multiclass\) are not the model's own"),
    (dict(image_size=96), r"image_size 96, but the model was saved for 64"),
    (dict(mean=[0.4, 0.4, 0.4]), r"mean \[0.4, 0.4, 0.4\], but the model was saved with"),
    (dict(context_slices=5, mean=[0.5] * 5, std=[0.5] * 5), r"context_slices 5, but the model was trained with 1"),
])
def test_a_spec_that_does_not_describe_its_model_is_refused(saved_model, tmp_path, change, message):
    with pytest.raises(UserError, match=message):
        Segmenter.load(_edit_spec(saved_model, tmp_path, **change))


def test_the_untouched_spec_loads_and_a_folder_without_an_image_processor_is_checked_by_its_weights(saved_model,
                                                                                                   tmp_path):
    assert Segmenter.load(saved_model).spec.image_size == 64
    folder = _edit_spec(saved_model, tmp_path, image_size=96)
    (folder / "preprocessor_config.json").unlink()
    assert Segmenter.load(folder).spec.image_size == 96  # (nothing says 64 any more: a size the model takes)


def test_the_compile_backend_compiles_the_tiny_model_once_and_gives_eager_logits(saved_model):
    """--backend compile (torch.compile, inductor: kernels generated here, ~40 s on 2 cores, once) against eager;
    the model's state keeps its plain keys (compiled in place)."""
    import torch

    from giseg.inference.segmenter import Segmenter

    eager, compiled = Segmenter.load(saved_model), Segmenter.load(saved_model, backend="compile")
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = eager.logits(x), compiled.logits(x)
    assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), float((got - ref).abs().max())
    assert compiled.model._compiled_call_impl is not None  # really compiled, not eager under another name
    assert not [k for k in compiled.model.state_dict() if "_orig_mod" in k]
