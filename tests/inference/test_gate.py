"""The slice gate: the rule predict applies, and tune's search over its thresholds (adopted only where it helps)."""
import numpy as np
import pytest

from giseg.evaluation.tuning import Tuner, Volume, as_spec_values, start_decisions
from giseg.inference.gate import gate_slice
from giseg.inference.spec import InferenceSpec

CLASSES = ("a", "b")


def test_a_class_is_emptied_where_the_gate_says_absent_or_too_few_of_its_pixels_are_predicted():
    masks = np.zeros((3, 2, 8, 8), bool)
    masks[:, 0, :2, :2] = True  # 4 pixels of a on every slice
    masks[:, 1, :5, :5] = True  # 25 pixels of b
    presence = np.array([[0.9, 0.9], [0.2, 0.9], [0.9, 0.4]], np.float32)
    out = gate_slice(masks, presence, (0.5, 0.5), (0, 12))
    assert out[:, 0].any((1, 2)).tolist() == [True, False, True]  # slice 1: a called absent
    assert out[:, 1].any((1, 2)).tolist() == [True, True, False]  # slice 2: b called absent
    assert not gate_slice(masks, presence, (0.0, 0.0), (4, 0))[:, 0].any()  # 4 pixels are not more than 4
    assert np.array_equal(gate_slice(masks, presence, (0.0, 0.0), (0, 0)), masks)  # off: unchanged


def _spec():
    return InferenceSpec("gi", "multilabel", CLASSES, 64, 1, 2, (0, 0, 0), (1, 1, 1), (0.5, 0.5))


def _gated_volumes(presence_of_empty: float):
    """Organ slices 0-3 predicted right; empty slices 4-7 with a confident 30-pixel false positive of class a."""
    d = 8
    truth = np.zeros((d, 2, 24, 24), bool)
    truth[:4, 0, 5:12, 5:12] = truth[:4, 1, 14:20, 14:20] = True
    probs = truth * 0.9
    probs[4:, 0, 2:8, 2:7] = 0.95  # no area or max-probability gate can tell these from the organ
    presence = np.where(truth.any((2, 3)), 0.9, presence_of_empty).astype(np.float32)
    return [Volume(np.arange(d), probs.astype(np.float32), None, truth, None, presence)]


def test_tune_adopts_the_slice_gate_that_empties_false_positives_on_empty_slices():
    tuner = Tuner(_gated_volumes(0.1), "multilabel", CLASSES, "1", workers=1, search=("slice_gate",))
    chosen, before, after = tuner.search(start_decisions(_spec()))
    assert chosen[0]["gate_threshold"] > 0.1 and after["dice_a"] == 1.0 and after["score"] > before["score"]
    assert chosen[1]["gate_threshold"] == 0 and chosen[1]["gate_min_pixels"] == 0  # b had nothing to gain: off
    values = as_spec_values(chosen, "multilabel", gated=True)
    assert values["gate_threshold"][0] == chosen[0]["gate_threshold"]
    assert InferenceSpec(**{**_spec().__dict__, **values}).problems() == []


def test_a_gate_that_cannot_tell_empty_slices_is_not_adopted_and_the_spec_says_off_not_untuned():
    tuner = Tuner(_gated_volumes(0.9), "multilabel", CLASSES, "1", workers=1, search=("slice_gate",))
    chosen, before, after = tuner.search(start_decisions(_spec()))
    assert after["score"] == before["score"]
    assert all(d["gate_threshold"] == 0 and d["gate_min_pixels"] == 0 for d in chosen)
    # 0 and 0: predict with the same --gate_model gates nothing, as tune scored it (None would mean the classifiers'
    # own thresholds); without --gate_model at all there is nothing to set
    values = as_spec_values(chosen, "multilabel", gated=True)
    assert values["gate_threshold"] == (0.0, 0.0) and values["gate_min_pixels"] == (0, 0)
    assert as_spec_values(chosen, "multilabel", gated=False)["gate_threshold"] is None


@pytest.mark.parametrize("field,value,why", [("gate_threshold", (0.5,), "one per class"),
                                             ("gate_min_pixels", (1.5, 2), "integers >= 0")])
def test_a_spec_with_malformed_gate_values_is_refused(field, value, why):
    bad = InferenceSpec(**{**_spec().__dict__, field: value}).problems()
    assert bad and bad[0].startswith(field) and why in bad[0]
