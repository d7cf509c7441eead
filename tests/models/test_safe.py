"""Model folders are not trusted: their code never runs, their pickles are not opened unless asked (models/safe.py)."""
import json
import os
import pickle
import shutil

import pytest
import torch

from giseg.data.gi import GI_CLASSES
from giseg.inference.segmenter import Segmenter
from giseg.models.load import load_model
from giseg.utils.errors import UserError


def copy_of(folder, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def plant_code(folder, model_type=None):
    """auto_map entries naming a module in the folder whose import would leave a marker file."""
    marker = folder / "CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import SegformerConfig as EvilConfig\n"
                                    "from transformers import SegformerForSemanticSegmentation as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForSemanticSegmentation": "evil.EvilModel"}
    if model_type:
        config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    return marker


def no_prompt(monkeypatch):
    def refuse(*_):
        raise AssertionError("a prompt was shown")
    monkeypatch.setattr("builtins.input", refuse)


def test_a_folder_whose_config_names_its_own_code_is_refused_and_the_code_never_runs(saved_model, tmp_path,
                                                                                     monkeypatch):
    no_prompt(monkeypatch)
    folder = copy_of(saved_model, tmp_path)
    marker = plant_code(folder, model_type="evil-net")
    with pytest.raises(UserError, match=r"asks to run code from the folder \(evil.EvilConfig, evil.EvilModel"):
        Segmenter.load(folder)
    with pytest.raises(UserError, match="never runs a model folder's code"):
        load_model(str(folder), "multilabel", GI_CLASSES)
    assert not marker.exists()


def test_auto_map_beside_a_known_family_loads_the_builtin_class_without_running_the_code(saved_model, tmp_path,
                                                                                         monkeypatch):
    no_prompt(monkeypatch)
    folder = copy_of(saved_model, tmp_path)
    marker = plant_code(folder)
    seg = Segmenter.load(folder)
    assert type(seg.model.hf).__module__.startswith("transformers.")
    load_model(str(folder), "multilabel", GI_CLASSES)
    assert not marker.exists()


def as_pickle_only(folder, tmp_path):
    from safetensors.torch import load_file

    out = copy_of(folder, tmp_path)
    torch.save(load_file(out / "model.safetensors"), out / "pytorch_model.bin")
    (out / "model.safetensors").unlink()
    return out


def test_a_folder_with_pickled_weights_only_is_refused_unless_allow_bin(saved_model, tmp_path):
    folder = as_pickle_only(saved_model, tmp_path)
    with pytest.raises(UserError, match=r"weights are a pickle \(pytorch_model.bin\).*--allow_bin"):
        Segmenter.load(folder)
    with pytest.raises(UserError, match=r"weights are a pickle"):
        load_model(str(folder), "multilabel", GI_CLASSES)
    seg = Segmenter.load(folder, allow_bin=True)
    want = Segmenter.load(saved_model).model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in seg.model.state_dict().items())


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_one_line_even_with_allow_bin_and_nothing_in_it_runs(saved_model, tmp_path):
    folder = as_pickle_only(saved_model, tmp_path)
    marker = tmp_path / "PAYLOAD_RAN"
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"refused by torch.load\(weights_only=True\)"):
        Segmenter.load(folder, allow_bin=True)
    assert not marker.exists()


def test_saved_weights_have_the_mode_of_the_umask_not_0600(saved_model):
    for f in saved_model.iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name
