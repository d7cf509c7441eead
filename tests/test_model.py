import pytest
import torch

from conftest import FAMILIES
from losses import SegmentationLoss, upsample_like
from model import SegmentationModel, freeze_unused_parameters, load_model
from utils import UserError


@pytest.mark.parametrize("family", FAMILIES)
def test_head_is_replaced_and_the_rest_loads(tiny_models, family):
    loaded = load_model(str(tiny_models[family]), "multilabel")
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
    loaded = load_model(str(tiny_models[family]), task, aux_weight=0.4)
    model = SegmentationModel(loaded.model)
    frozen = freeze_unused_parameters(model)
    assert (family == "dpt") == bool(frozen)  # only DPT carries weights its forward never uses
    x = torch.randn(2, 3, 64, 64)
    packed = torch.randint(0, 8, (2, 64, 64), dtype=torch.uint8)
    logits, aux = model(x)
    assert logits.shape[:2] == (2, 3 if task == "multilabel" else 4)
    assert (aux is not None) == (family != "segformer")  # UperNet, DPT, BEiT have an auxiliary head
    loss_fn = SegmentationLoss(task)
    loss = loss_fn(upsample_like(logits, (64, 64)), packed)
    if aux is not None:
        loss = loss + 0.4 * loss_fn(upsample_like(aux, (64, 64)), packed)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters without gradient (would break DDP): {no_grad[:5]}"


def test_aux_weight_zero_drops_the_auxiliary_head(tiny_models):
    loaded = load_model(str(tiny_models["upernet"]), aux_weight=0.0)
    assert loaded.model.auxiliary_head is None
    _, aux = SegmentationModel(loaded.model)(torch.randn(1, 3, 64, 64))
    assert aux is None


def test_unknown_hub_id_says_hub_unreachable_and_how_to_pass_a_folder():
    with pytest.raises(UserError) as err:
        load_model("nobody/no-such-model-xyz")
    msg = str(err.value)
    assert "nobody/no-such-model-xyz" in msg and "hub may be unreachable" in msg and "--base_model <folder>" in msg


def test_folder_that_is_not_a_segmentation_model_is_rejected(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="not a semantic-segmentation model"):
        load_model(str(tmp_path))


def test_make_tiny_cli_writes_a_loadable_folder(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "m"
    subprocess.run([sys.executable, str(ROOT / "model.py"), "make-tiny", "--family", "dpt", "--out", str(out)],
                   check=True, capture_output=True)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "preprocessor_config.json").is_file()
