"""What loading a checkpoint returns, and the quick check that the Hugging Face hub is reachable (models/load.py,
models/classifier.py)."""
from __future__ import annotations

import contextlib
import json
import pickle
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import AutoConfig

from giseg.models.safe import check_model_folder
from giseg.utils.errors import UserError


@dataclass
class LoadedModel:
    model: nn.Module  # the transformers model
    family: str
    reinitialised: list[str]  # "name: old shape -> new shape"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    stats_source: str  # where mean/std came from, for the log


def _hub_hint(name: str) -> str:
    if Path(name).exists():
        return ""
    return (" If this is a hub id, the Hugging Face hub may be unreachable from here (no network, or "
            "HF_HUB_OFFLINE=1): on a machine with network run `hf download " + name + " --local-dir <folder>` "
            "(or from_pretrained(...).save_pretrained(<folder>)), copy the folder here and pass --base_model <folder>.")


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """For a hub id that is not in the local cache: one quick connection to the hub, so an unreachable hub is one
    line at once instead of the download's retries (about 25 s) before the same line. Offline mode and cached
    checkpoints need no connection."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # from_pretrained reads the cache (or says it is not there) without the network
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot load --base_model {repo_id!r}: the Hugging Face hub ({url.hostname}) is unreachable "
                        f"from here ({e.__class__.__name__}).{_hub_hint(repo_id)}") from None


def read_config(base_model: str, allow_bin: bool = False):
    """The config of ``base_model`` (hub id or folder), read without running its code (and, for a folder, checked
    not to need unpickling: check_model_folder); one UserError line when it cannot be read."""
    if Path(base_model).exists():
        check_model_folder(base_model, "--base_model", allow_bin)
    else:
        check_hub_reachable(base_model)
    try:
        return AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load --base_model {base_model!r}: {first.rstrip('.')}.{_hub_hint(base_model)}") from None


@contextlib.contextmanager
def weights_errors(base_model: str, allow_bin: bool = False):
    """from_pretrained's failures on weights as one UserError line: a pickle refused by torch.load(weights_only=True),
    or no (safetensors) weights."""
    try:
        yield
    except pickle.UnpicklingError as e:  # --allow_bin with a pickle that is not plain weights
        raise UserError(f"--base_model {base_model}: its pickled weights were refused by torch.load(weights_only="
                        f"True) ({str(e).splitlines()[-1][:160]}); nothing in them ran. Use safetensors weights") from None
    except OSError as e:  # no weights in a folder, or a hub repo without safetensors (or unreachable)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if Path(base_model).exists() or allow_bin else (
            " A hub repo whose weights are only a pickle needs --allow_bin (torch.load with weights_only=True).")
        raise UserError(f"cannot load the weights of --base_model {base_model}: {first.rstrip('.')}.{hint}") from None


def loaded_model(model: nn.Module, family: str, info: dict, base_model: str, mean, std, source: str) -> LoadedModel:
    """What from_pretrained(..., output_loading_info=True) gave, as a LoadedModel: the re-initialised layers named,
    and the input statistics of the checkpoint's own preprocessor_config.json when it has them (else ``mean``,
    ``std`` from ``source``)."""
    reinit = [f"{k}: {tuple(old)} -> {tuple(new)}" for k, old, new in info.get("mismatched_keys", [])]
    reinit += [f"{k}: new" for k in info.get("missing_keys", [])]
    proc_file = Path(base_model) / "preprocessor_config.json"
    if proc_file.is_file():
        proc = json.loads(proc_file.read_text())
        if "image_mean" in proc and "image_std" in proc:
            mean, std, source = proc["image_mean"], proc["image_std"], f"{proc_file}"
    return LoadedModel(model, family, sorted(reinit), tuple(mean), tuple(std), source)
