import pytest
import torch

from conftest import FAMILIES
from giseg.training.losses import make_loss
from giseg.inference.segmenter import upsample_like
from giseg.data.gi import GI_CLASSES as GI
from giseg.data.gi import GI_PRIORITY
from giseg.models.wrapper import SegmentationModel, freeze_unused_parameters, match_gradient_layout
from giseg.models.load import load_model
from giseg.utils.errors import UserError


@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_replaced_and_the_rest_loads(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), "multilabel", GI)
    assert loaded.family == family
    assert loaded.model.config.id2label == {0: "large_bowel", 1: "small_bowel", 2: "stomach"}
    assert loaded.reinitialised, "the 150-class classifier must be reported as re-initialised"
    assert all("150" in r for r in loaded.reinitialised)
    from transformers import AutoModelForSemanticSegmentation

    original = AutoModelForSemanticSegmentation.from_pretrained(tiny_models[family]).state_dict()
    state = loaded.model.state_dict()
    reinit_keys = {r.split(":")[0] for r in loaded.reinitialised}
    assert reinit_keys <= set(original) and all("classifier" in k or "head" in k for k in reinit_keys)
    same = [k for k in original if k not in reinit_keys]
    assert len(same) > 10 and set(same) <= set(state)
    for k in same:  # every other pretrained weight arrived unchanged
        torch.testing.assert_close(state[k], original[k], msg=k)
    for k in reinit_keys:
        assert state[k].shape[0] == 3 and original[k].shape[0] == 150


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_forward_backward_gives_finite_loss_and_gradients_everywhere(tiny_models, family, task):
    torch.manual_seed(0)
    loaded = load_model(str(tiny_models[family]), task, GI, aux_weight=0.4)
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    match_gradient_layout(model)
    assert (family == "dpt") == bool(frozen)  # only DPT carries weights its forward never uses
    x = torch.randn(2, 3, 64, 64)
    packed = torch.randint(0, 8, (2, 64, 64), dtype=torch.uint8)
    logits, aux = model(x)
    assert logits.shape[:2] == (2, 3 if task == "multilabel" else 4)
    assert (aux is not None) == (family != "segformer")  # UperNet, DPT, BEiT have an auxiliary head
    loss_fn = make_loss("bce_dice", task, GI, GI_PRIORITY)
    loss = loss_fn(upsample_like(logits, (64, 64)), packed)
    if aux is not None:
        loss = loss + 0.4 * loss_fn(upsample_like(aux, (64, 64)), packed)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient (would break DDP): {no_grad[:5]}"
    other_layout = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not other_layout, f"gradients in another layout than their parameter (DDP warns): {other_layout[:3]}"


def test_aux_weight_zero_drops_the_auxiliary_head(tiny_models):
    loaded = load_model(str(tiny_models["upernet"]), "multilabel", GI, aux_weight=0.0)
    assert loaded.model.auxiliary_head is None
    _, aux = SegmentationModel(loaded.model)(torch.randn(1, 3, 64, 64))
    assert aux is None


def test_unknown_hub_id_says_hub_unreachable_and_how_to_pass_a_folder():
    with pytest.raises(UserError) as err:
        load_model("nobody/no-such-model-xyz", "multilabel", GI)
    msg = str(err.value)
    assert "nobody/no-such-model-xyz" in msg and "hub may be unreachable" in msg and "--base_model <folder>" in msg


def test_folder_that_is_not_a_segmentation_model_is_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a semantic-segmentation model"):
        load_model(str(tmp_path), "multilabel", GI)


def test_make_tiny_cli_writes_a_loadable_folder(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "m"
    cmd = [sys.executable, str(ROOT / "model.py"), "make-tiny", "--family", "dpt", "--out", str(out)]
    first = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "preprocessor_config.json").is_file() and "replaced" not in first.stdout
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)  # docs/own-data.md after the demo
    assert again.stdout.strip() == f"{out} (replaced the earlier tiny model there)"  # (it said nothing: #43)


def test_an_auto_family_the_project_never_names_trains_predicts_and_scores(demo_dir, tmp_path):
    """MobileViTV2 is in AutoModelForSemanticSegmentation and nowhere in this project's code: a tiny random one
    goes through trainer.py, predict.py and score.py with no code change."""
    import json

    from transformers import AutoModelForSemanticSegmentation, MobileViTV2Config

    from giseg.commands.predict import main as predict_main
    from giseg.commands.score import main as score_main
    from giseg.training.loop import main as train_main

    torch.manual_seed(0)
    config = MobileViTV2Config(width_multiplier=0.25, aspp_out_channels=32, id2label={i: f"c{i}" for i in range(150)})
    AutoModelForSemanticSegmentation.from_config(config).save_pretrained(tmp_path / "mobilevitv2")
    run = tmp_path / "run"
    assert train_main(["--base_model", str(tmp_path / "mobilevitv2"), "--data_dir", str(demo_dir), "--output_dir",
                       str(run), "--image_size", "64", "--epochs", "1", "--n_folds", "3", "--num_workers", "0",
                       "--cache_dir", str(tmp_path / "cache")]) == 0
    log = (run / "train.log").read_text()
    assert "(mobilevitv2)" in log and "re-initialised for our labels: segmentation_head.classifier" in log
    sub = tmp_path / "val.csv"
    assert predict_main(["--model", str(run / "best"), "--data_dir", str(demo_dir), "--out", str(sub), "--fold", "0",
                         "--n_folds", "3", "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]) == 0
    assert score_main(["--pred", str(sub), "--data_dir", str(demo_dir), "--json", str(tmp_path / "s.json")]) == 0
    assert 0 <= json.loads((tmp_path / "s.json").read_text())["score"] <= 1


@pytest.mark.parametrize("family", [*FAMILIES, "mask2former", "unet", "unext"])
def test_a_5_channel_model_at_initialisation_gives_the_3_channel_logits_on_repeated_input(tiny_models, family,
                                                                                          tmp_path):
    from giseg.inference.spec import InferenceSpec
    from giseg.inference.segmenter import Segmenter
    from giseg.models.tiny import make_tiny
    from giseg.models.load import save_model

    base = str(tiny_models[family]) if family in tiny_models else family
    if family == "mask2former":
        base = str(make_tiny("mask2former", tmp_path / "m2f"))
    torch.manual_seed(0)
    three = load_model(base, "multilabel", GI)
    torch.manual_seed(0)
    five = load_model(base, "multilabel", GI, in_channels=5)
    assert any("widened to 5 input channels" in r for r in five.reinitialised)
    assert len(five.mean) == len(five.std) == 5 and five.mean[2] == three.mean[1]
    scan = torch.rand(1, 1, 64, 64)

    def normalised(loaded):
        mean, std = torch.tensor(loaded.mean).view(1, -1, 1, 1), torch.tensor(loaded.std).view(1, -1, 1, 1)
        return (scan.expand(1, len(loaded.mean), 64, 64) - mean) / std

    m3, m5 = SegmentationModel(three.model).eval(), SegmentationModel(five.model).eval()
    with torch.no_grad():
        want, got = m3(normalised(three))[0], m5(normalised(five))[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)  # float sums in another order
    # saved as the trainer saves it, it loads back with 5 channels (Auto class) and gives the same logits
    spec = InferenceSpec("gi", "multilabel", GI, 64, 5, 2, five.mean, five.std, (0.5,) * 3)
    save_model(five.model, tmp_path / "five", spec)
    loaded = Segmenter.load(tmp_path / "five")
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(normalised(five))[0], got, rtol=1e-4, atol=1e-5)


def test_an_unreachable_hub_is_one_line_at_once_not_after_the_downloads_retries(tmp_path):
    """A hub id that is not cached, with the hub unreachable and offline mode not set: one quick connection attempt
    names the hub and says how to pass a folder, instead of the download's retries (about 25 s) first."""
    import os
    import subprocess
    import sys

    env = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}, "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}  # port 9 (discard) on loopback: refused at once; an empty cache
    code = "from giseg.models.load import load_config; load_config('someone/some-model')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "the Hugging Face hub (127.0.0.1) is unreachable from here (ConnectionRefusedError)" in res.stderr
    assert "hf download someone/some-model --local-dir <folder>" in res.stderr


@pytest.mark.parametrize("family", [*FAMILIES, "unet", "unext"])
@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_head_prior_starts_every_class_at_that_probability_in_the_new_head_only(tiny_models, family, task):
    """--head_prior sets the bias of each layer re-initialised for our labels (decode and auxiliary classifier; a
    baseline's head) so that every class gets that probability where the features are 0; nothing else changes."""
    base = str(tiny_models[family]) if family in tiny_models else family
    torch.manual_seed(0)
    plain = load_model(base, task, GI)
    torch.manual_seed(0)
    primed = load_model(base, task, GI, head_prior=0.01)
    set_biases = [r.split(":")[0] for r in primed.reinitialised if "--head_prior" in r]
    expected = 2 if family in ("upernet", "dpt", "beit") else 1  # + the auxiliary head's classifier
    assert len(set_biases) == expected, primed.reinitialised
    state, before = primed.model.state_dict(), plain.model.state_dict()
    for name in set_biases:
        probs = torch.sigmoid(state[name]) if task == "multilabel" else torch.softmax(state[name], 0)[1:]
        torch.testing.assert_close(probs, torch.full((3,), 0.01))
        assert not torch.allclose(state[name], before[name])
    for name in set(state) - set(set_biases):
        torch.testing.assert_close(state[name], before[name], msg=name)


def test_head_prior_keeps_the_bias_of_a_head_that_already_fits_and_of_mask2former(tiny_models, tmp_path):
    from giseg.models.tiny import make_tiny

    first = load_model(str(tiny_models["segformer"]), "multilabel", GI, head_prior=0.01)
    with torch.no_grad():
        first.model.decode_head.classifier.bias.fill_(0.7)  # "trained"
    first.model.save_pretrained(tmp_path / "fitted")
    again = load_model(str(tmp_path / "fitted"), "multilabel", GI, head_prior=0.01)
    assert not again.reinitialised
    assert torch.all(again.model.decode_head.classifier.bias == 0.7)
    m2f = load_model(str(make_tiny("mask2former", tmp_path / "m2f")), "multilabel", GI, head_prior=0.01)
    assert not any("--head_prior" in r for r in m2f.reinitialised)


def test_head_prior_that_leaves_no_background_probability_is_refused(tiny_models):
    with pytest.raises(UserError, match=r"--head_prior 0.4 x 3 classes leaves no probability for the background"):
        load_model(str(tiny_models["segformer"]), "multiclass", GI, head_prior=0.4)
