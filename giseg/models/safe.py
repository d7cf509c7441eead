"""Loading a model folder without trusting it: no code of its own runs, and no pickle is opened unless asked.

Every model this toolkit loads (trainer.py's --base_model, giseg predict / tune / figures / the app's --model) goes
through ``check_model_folder`` and ``loading_kwargs``: ``trust_remote_code=False`` explicitly (a config whose
``auto_map`` names code for a family transformers does not know is refused with one line, never prompted for), and
weights from safetensors only; a folder whose weights are a pickle (``pytorch_model.bin``) is refused unless the
user opts in with ``--allow_bin`` (then torch.load with ``weights_only=True``, transformers' restricted
unpickler). Light: json and pathlib only, so the CLIs' help does not pay for transformers.
"""
from __future__ import annotations

import json
from pathlib import Path

from giseg.models.registry import FAMILIES
from giseg.utils.errors import UserError

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ALLOW_BIN_HELP = ("also load weights stored as a pickle (pytorch_model.bin: torch.load with weights_only=True) when a "
                  "model has no safetensors; off: safetensors only")


def loading_kwargs(allow_bin: bool = False) -> dict:
    """The from_pretrained arguments of every load: no remote code, safetensors unless ``allow_bin``."""
    return {"trust_remote_code": False, "use_safetensors": None if allow_bin else True}


def custom_code(config: dict) -> list[str]:
    """The code a config.json asks to run (its ``auto_map`` entries), as 'module.Class' strings."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict):
        return []
    return sorted({str(v[0] if isinstance(v, (list, tuple)) else v) for v in auto_map.values()})


def check_model_folder(folder: str | Path, what: str, allow_bin: bool = False) -> dict:
    """A local model folder's config.json (as a dict), refused with one line when loading it would run its code
    (an ``auto_map`` for a family transformers does not know) or unpickle its weights (no safetensors, and not
    ``allow_bin``)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {folder}: no readable config.json ({e.__class__.__name__}); pass a model folder "
                        "(save_pretrained)") from None
    if not isinstance(config, dict):
        raise UserError(f"{what} {folder}: config.json is not a JSON object")
    code = custom_code(config)
    if code:  # (transformers' table of families: only imported when a config names code)
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = bool(code) and config.get("model_type") in (*CONFIG_MAPPING_NAMES, *(f.model_type for f in FAMILIES.values() if f.kind != "hub"))
    if code and not known:
        raise UserError(f"{what} {folder}: its config.json asks to run code from the folder ({', '.join(code)}: "
                        f"model_type {config.get('model_type')!r}); this toolkit never runs a model folder's code. "
                        "Use a model of a transformers family (save_pretrained of AutoModelForSemanticSegmentation)")
    if not any(folder.glob("*.safetensors")):
        pickles = [n for n in PICKLED_WEIGHTS if (folder / n).is_file()]
        if pickles and not allow_bin:
            raise UserError(f"{what} {folder}: its weights are a pickle ({pickles[0]}), which can run code when "
                            "loaded, and there is no model.safetensors. Convert it where you trust it (from_pretrained"
                            "(folder).save_pretrained(folder)), or pass --allow_bin to load it with torch.load("
                            "weights_only=True)")
    return config
