"""ONNX export (inference/onnx_model.py, giseg export-onnx) and the ONNX Runtime backend of the Segmenter."""
import json

import numpy as np
import pytest
import torch

from conftest import SEGMENTERS, base_model

from giseg.data.gi import GI_CLASSES
from giseg.inference.export import PARITY_TOLERANCE, _static_adaptive_avg_pool2d, export_onnx
from giseg.inference.onnx_model import ONNX_FILE
from giseg.inference.segmenter import Segmenter
from giseg.utils.errors import UserError

pytest.importorskip("onnxruntime", reason="giseg[onnx] is part of the dev install (requirements.txt)")


def _model_folder(base: str, out, task: str = "multilabel"):
    """A folder as the trainer writes it (weights, image processor, spec) for a tiny family or a CNN baseline."""
    from giseg.inference.spec import InferenceSpec
    from giseg.models.load import load_model, save_model

    loaded = load_model(base, task, GI_CLASSES)
    spec = InferenceSpec(dataset="gi", task=task, classes=GI_CLASSES, image_size=64, context_slices=1,
                         context_stride=2, mean=loaded.mean, std=loaded.std,
                         thresholds=(0.5,) * 3 if task == "multilabel" else (),
                         patch_size="32,64,64" if loaded.family == "gi_volume" else "")
    save_model(loaded.model, out, spec)
    return out


@pytest.mark.parametrize("output", [1, 2, 3, 6, (4, 5)])
def test_the_exportable_adaptive_pooling_is_pytorchs(output):
    x = torch.randn(2, 5, 9, 9)
    assert torch.allclose(_static_adaptive_avg_pool2d(x, output), torch.nn.functional.adaptive_avg_pool2d(x, output),
                          atol=1e-6)


@pytest.mark.parametrize("base", SEGMENTERS)
def test_every_family_exports_and_onnx_runtime_gives_pytorchs_logits(base, tiny_models, tmp_path):
    folder = _model_folder(base_model(base, tiny_models, tmp_path), tmp_path / "model", "multiclass" if base == "dpt" else "multilabel")
    report = export_onnx(folder)
    assert report["max_relative_difference"] <= PARITY_TOLERANCE and (folder / ONNX_FILE).is_file()
    assert report["dynamic"] == (["batch", "height", "width"] if base == "segformer" else ["batch"])
    eager, onnx = Segmenter.load(folder), Segmenter.load(folder, backend="onnxruntime")
    # a batch size never traced; a 3D model: a volume of 40 slices (its sliding window: 2 windows, 1 batch of them)
    shape = (1, 1, 40, 64, 64) if eager.spec.patch_size else (5, 3, 64, 64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = eager.logits(x, tta=True).float(), onnx.logits(x, tta=True)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) <= PARITY_TOLERANCE * max(1.0, float(ref.abs().max()))


def test_an_export_never_writes_into_another_models_folder_or_a_data_folder(saved_model, tmp_path):
    """--out replaced another model folder's inference_spec.json (its weights then ran under this model's spec) or
    wrote into the Kaggle data folder (issue #38): a folder export-onnx did not write is refused, untouched."""
    import shutil

    other = tmp_path / "other-model"
    shutil.copytree(saved_model, other)
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("id,class,segmentation\n")
    for out, name in ((other, "config.json"), (data, "train.csv")):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(UserError, match=f"--out {out} already holds files that giseg export-onnx did not write"):
            export_onnx(saved_model, out)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(UserError, match="lies inside --model"):
        export_onnx(saved_model, saved_model / "deploy")
    export_onnx(saved_model, tmp_path / "deploy")
    export_onnx(saved_model, tmp_path / "deploy")  # a rerun replaces its own export


def test_an_export_elsewhere_carries_the_spec_and_predicts_without_the_weights(saved_model, tmp_path):
    out = tmp_path / "deploy"
    export_onnx(saved_model, out)
    assert sorted(p.name for p in out.iterdir()) == [".giseg-output", "config.json", "inference_spec.json", ONNX_FILE,
                                                     "preprocessor_config.json"]  # (the mark: export-onnx's folder)
    seg = Segmenter.load(out, backend="onnxruntime")
    import dataclasses

    assert seg.spec.onnx_sha256  # the deploy folder's spec records the file it runs (the rest is the model's)
    assert dataclasses.replace(seg.spec, onnx_sha256=None) == Segmenter.load(saved_model).spec
    assert seg.device.type == "cpu"


def test_a_missing_or_stale_export_is_refused_with_the_command_that_makes_it(saved_model, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    with pytest.raises(UserError, match=f"no {ONNX_FILE} .*giseg export-onnx --model {folder}"):
        Segmenter.load(folder, backend="onnxruntime")
    export_onnx(folder)
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key] + 1
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="exported from other weights .*export it again"):
        Segmenter.load(folder, backend="onnxruntime")


def test_export_onnx_command_writes_the_model_and_reports_the_parity(saved_model, tmp_path, capsys):
    from giseg.commands.export_onnx import main

    assert main(["--model", str(saved_model), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'o' / ONNX_FILE}" in out and "ONNX Runtime vs PyTorch logits" in out
    meta = json.loads((tmp_path / "o" / "inference_spec.json").read_text())
    assert meta["image_size"] == 64
    assert np.isfinite(float(out.split("max difference ")[1].split()[0]))


def test_a_deploy_folder_runs_only_the_onnx_file_its_spec_records_and_a_damaged_one_is_one_line(
        saved_model, tiny_models, tmp_path):
    """A deploy folder (no weights) ran whatever model.onnx lay in it, and a truncated one was a traceback (issue
    #38): the spec records the exported file's sha256, and anything else is refused naming both sides."""
    import shutil

    deploy, other = tmp_path / "deploy", tmp_path / "other"
    export_onnx(saved_model, deploy)
    Segmenter.load(deploy, backend="onnxruntime")  # its own file runs
    export_onnx(_model_folder(base_model("unet", tiny_models, tmp_path), tmp_path / "unet"), other)
    original = (deploy / ONNX_FILE).read_bytes()
    shutil.copy(other / ONNX_FILE, deploy / ONNX_FILE)  # another model's export, dropped in
    with pytest.raises(UserError, match=f"{ONNX_FILE} is not the file exported with this spec .*another model's"):
        Segmenter.load(deploy, backend="onnxruntime")
    spec = json.loads((deploy / "inference_spec.json").read_text())
    (deploy / "inference_spec.json").write_text(json.dumps({**spec, "onnx_sha256": None}))  # (an older export)
    (deploy / ONNX_FILE).write_bytes(original[:len(original) // 2])
    with pytest.raises(UserError, match=f"{ONNX_FILE} is not a readable ONNX model .*export it again"):
        Segmenter.load(deploy, backend="onnxruntime")


def test_a_spec_edited_to_another_input_layout_of_the_same_channel_count_is_refused(saved_model, tmp_path):
    """context_slices 1 and 3 both feed 3 channels: an edited spec was accepted and scored lower (issue #38). The
    model's config records the layout it was trained with, and the ONNX export records it too."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(saved_model, folder)
    export_onnx(folder)
    spec = json.loads((folder / "inference_spec.json").read_text())
    assert spec["context_slices"] == 1
    (folder / "inference_spec.json").write_text(json.dumps({**spec, "context_slices": 3}))
    for backend in ("eager", "onnxruntime"):
        with pytest.raises(UserError, match="context_slices 3, but the model was trained with 1"):
            Segmenter.load(folder, backend=backend)
