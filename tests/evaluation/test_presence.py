"""Slice-classifier figures: AUC, F1 at the threshold, empty slices called empty."""
import math

import numpy as np
import pytest
import torch

from giseg.evaluation.presence import presence_figures, presence_targets, roc_auc, selection_figure


def test_auc_is_the_share_of_positive_negative_pairs_ranked_right_with_ties_counted_half():
    # pairs (pos, neg): (0.35, 0.1) right, (0.35, 0.4) wrong, (0.8, 0.1) right, (0.8, 0.4) right -> 3/4
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5, 0.9]), np.array([0, 1, 1])) == pytest.approx(0.75)  # one tie: 1/2 + 1, of 2
    assert math.isnan(roc_auc(np.array([0.2, 0.3]), np.array([1, 1])))  # one kind only: undefined


def test_figures_count_f1_at_each_classes_threshold_and_empty_slices_kept_empty():
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.1], [0.7, 0.1]])
    truth = np.array([[1, 0], [1, 1], [0, 0], [0, 0]], bool)
    f = presence_figures(probs, truth, (0.5, 0.5), ("a", "b"))
    assert f["f1_a"] == pytest.approx(2 * 2 / (3 + 2))  # predicted 3, true 2, both 2
    assert f["f1_b"] == pytest.approx(1.0)
    assert f["auc_a"] == pytest.approx(0.75) and f["auc_b"] == pytest.approx(1.0)  # a: 0.6 < 0.7 (a negative)
    assert (f["n_empty"], f["empty_correct"]) == (2, 0.5)  # slice 2 called empty, slice 3 not (a at 0.7)
    higher = presence_figures(probs, truth, (0.8, 0.5), ("a", "b"))
    assert higher["empty_correct"] == 1.0 and higher["f1_a"] == pytest.approx(2 / 3)


def test_a_run_whose_validation_never_varies_is_chosen_by_its_f1_and_the_log_says_so():
    """No organ-free slice: every AUC is undefined. It was logged as nan and then as 'new best mean AUC 1.0000'
    (issue #38); the figure that selects is the F1, named as such, and the log says undefined."""
    from giseg.evaluation.presence import describe_presence

    f = presence_figures(np.array([[0.9], [0.2]]), np.array([[1], [1]], bool), (0.5,), ("a",))
    name, value = selection_figure(f)
    assert math.isnan(f["auc_mean"]) and value == f["f1_mean"] == pytest.approx(2 / 3)
    assert name.startswith("mean F1 (AUC undefined")
    line = describe_presence(f, ("a",))
    assert "auc a undefined | mean undefined" in line and "empty correct undefined" in line and "nan" not in line
    assert selection_figure(presence_figures(np.array([[0.9], [0.2]]), np.array([[1], [0]], bool), (0.5,),
                                             ("a",))) == ("mean AUC", 1.0)


def test_presence_targets_count_only_labelled_pixels():
    from giseg.data.masks import IGNORE_BIT

    packed = torch.zeros(2, 4, 4, dtype=torch.uint8)
    packed[0, 1, 1] = 0b01  # class 0 on slice 0
    packed[1, 2, 2] = 0b10 | (1 << IGNORE_BIT)  # class 1 on an unlabelled pixel of slice 1: not shown
    assert presence_targets(packed, 2).tolist() == [[1.0, 0.0], [0.0, 0.0]]
