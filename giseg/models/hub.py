"""What loading a checkpoint returns, and the quick check that the Hugging Face hub is reachable (models/load.py,
models/classifier.py)."""
from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from giseg.utils import UserError


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


