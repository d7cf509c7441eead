import numpy as np

from giseg.evaluation.tuning import Tuner, Volume, start_decisions

CLASSES = ("a", "b")


def _volume(probs: np.ndarray, truth: np.ndarray) -> Volume:
    return Volume(np.arange(len(probs)), probs.astype(np.float16), None, truth, None)


def _ball(shape, centre, r):
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= r ** 2


def _start():
    from giseg.inference.spec import InferenceSpec

    spec = InferenceSpec("gi", "multilabel", CLASSES, 64, 1, 2, (0, 0, 0), (1, 1, 1), (0.5, 0.5))
    return start_decisions(spec)


def test_tuned_decisions_never_score_below_the_defaults_on_the_data_they_were_tuned_on():
    rng = np.random.default_rng(0)
    shape = (8, 24, 24)
    volumes = []
    for k in range(3):
        truth = np.stack([_ball(shape, (4, 8 + k, 10), 4), _ball(shape, (3, 15, 14 - k), 3)], axis=1)
        # under-confident organs (0.3 to 0.45) on a background up to 0.25: the default 0.5 finds nothing
        probs = np.where(truth, 0.3 + 0.15 * rng.random(truth.shape), 0.25 * rng.random(truth.shape))
        volumes.append(_volume(probs, truth))
    tuner = Tuner(volumes, "multilabel", CLASSES, "1", workers=2)
    chosen, before, after = tuner.search(_start())
    assert after["score"] >= before["score"]
    assert after["score"] > before["score"] + 0.05  # here the 0.5 threshold misses the organs: tuning finds them
    assert [d["thresholds"] for d in chosen] != [0.5, 0.5]
    # the reported figures are the chosen decisions' own
    again = tuner.figures([tuner.class_figures(c, d) for c, d in enumerate(chosen)])
    assert again["score"] == after["score"]


def test_keeping_the_largest_component_is_adopted_only_where_it_helps():
    shape = (10, 20, 20)
    blob, stray = _ball(shape, (5, 6, 6), 3), _ball(shape, (5, 15, 15), 2)
    # class a: the truth is one organ, the prediction adds a stray blob -> "largest" helps
    # class b: the truth is two separate pieces, predicted exactly -> "largest" would delete one: skipped
    truth = np.stack([blob, blob | stray], axis=1)
    probs = np.stack([(blob | stray) * 0.9, (blob | stray) * 0.9], axis=1)
    tuner = Tuner([_volume(probs, truth)], "multilabel", CLASSES, "1", workers=1)
    chosen, before, after = tuner.search(_start())
    assert chosen[0]["postprocess"] == "largest" and chosen[1]["postprocess"] == "none"
    assert after["dice_a"] == 1.0 and after["score"] > before["score"]


def test_a_bad_search_is_refused_before_any_model_is_loaded_or_predicts(tmp_path, capsys):
    """--search was checked only after every validation slice had been predicted (issue #38): now it is the first
    thing, before the models are even looked for (the folders here do not exist)."""
    from giseg.commands.tune import main as tune_main

    assert tune_main(["--model", str(tmp_path / "no-model"), "--data_dir", str(tmp_path / "no-data"), "--search",
                      "thresholds,colours"]) == 2
    assert "--search takes steps of" in capsys.readouterr().err
