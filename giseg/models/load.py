"""Pretrained Hugging Face segmentation models with a new head for our classes.

    giseg make-tiny --family segformer --out demo/models/tiny-segformer

``load_model`` calls ``AutoModelForSemanticSegmentation.from_pretrained(<hub id or folder>, id2label=...,
ignore_mismatched_sizes=True)``: everything loads except the classifier layers of the decode head and the
auxiliary head, which are re-initialised for our labels (and reported). ``SegmentationModel`` returns the
auxiliary head's logits too, so they can join the loss (every parameter gets a gradient under DDP).

Every model this toolkit loads goes through ``loading_kwargs`` and ``check_model_folder`` (models/safe.py): no code from a model folder
or the Hub ever runs (``trust_remote_code=False``, explicitly: a config whose ``auto_map`` names code of its own is
refused with one line, never prompted for), and weights come from safetensors only; a folder whose weights are a
pickle (``pytorch_model.bin``) is refused unless the user opts in with ``--allow_bin`` (then torch.load with
``weights_only=True``, transformers' restricted unpickler).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES

from giseg.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from giseg.models.baselines import (  # also registers them with the Auto classes
    BASELINE_FAMILIES,
    BASELINES,
    build_baseline,
)
from giseg.models.classifier import load_classifier
from giseg.models.families import FAMILY_STATS, QUERY_FAMILIES, auto_class, make_image_processor
from giseg.models.hub import LoadedModel, loaded_model, read_config, weights_errors
from giseg.models.tasks import get_task
from giseg.models.safe import loading_kwargs
from giseg.models.registry import list_families
from giseg.models.volume import VOLUMES, build_volume
from giseg.models.widen import input_channels, widen_channels, widen_input
from giseg.utils.errors import UserError
from giseg.utils.files import atomic_dir


def load_model(base_model: str, task: str, classes: tuple[str, ...], aux_weight: float = 0.4,
               allow_bin: bool = False, in_channels: int = 3, head_prior: float = 0.0,
               modalities: int = 1) -> LoadedModel:
    """Load ``base_model`` (hub id or local folder) with a fresh head for ``task``'s labels of ``classes``; with
    ``in_channels`` other than 3 (--context_slices 5, 7 ...; images of ``modalities`` channels each) its input layer
    widened (widen_input) and its statistics too;
    with ``head_prior`` > 0 the new head's output biases set so that every class starts at that probability
    (set_prior_bias)."""
    if not get_task(task).segments:  # a slice classifier (models/classifier.py)
        loaded = load_classifier(base_model, classes, allow_bin)
    else:
        loaded = _load_model(base_model, task, classes, aux_weight, allow_bin, modalities)
    if head_prior > 0 and get_task(task).segments:
        for name in set_prior_bias(loaded.model, loaded.reinitialised, task, len(classes), head_prior):
            loaded.reinitialised.append(f"{name}: bias set for a class probability of {head_prior:g} (--head_prior)")
    if loaded.family == "gi_volume":  # a 3D network: its input is the image's channels, with its own statistics
        loaded.mean, loaded.std = (0.5,) * modalities, (0.5,) * modalities
        loaded.stats_source = "a 3D network's own: scans in [0, 1] to [-1, 1]"
    elif in_channels != 3 and input_channels(loaded.model) != in_channels:
        layer = widen_input(loaded.model, in_channels, modalities)
        loaded.reinitialised.append(f"{layer}: widened to {in_channels} input channels (pretrained weights shared "
                                    "out; same output for the same image in every channel)")
        loaded.mean = widen_channels(loaded.mean, in_channels, modalities)
        loaded.std = widen_channels(loaded.std, in_channels, modalities)
    return loaded


def prior_bias(task: str, n_classes: int, prior: float) -> torch.Tensor:
    """The output bias under which every class has probability ``prior`` at every pixel when the features are 0:
    multilabel, log(p / (1 - p)) per sigmoid channel; multiclass, background 0 and each class log(p / (1 - K p)),
    so that the softmax gives each of the K classes p and the background the rest."""
    if not get_task(task).background:
        return torch.full((n_classes,), math.log(prior / (1 - prior)))
    if n_classes * prior >= 1:
        raise UserError(f"--head_prior {prior:g} x {n_classes} classes leaves no probability for the background: "
                        f"use a value below {1 / n_classes:.3g} (e.g. 0.01), or 0 to keep the library's zero bias")
    return torch.cat([torch.zeros(1), torch.full((n_classes,), math.log(prior / (1 - n_classes * prior)))])


def set_prior_bias(model: nn.Module, reinitialised: list[str], task: str, n_classes: int, prior: float) -> list[str]:
    """RetinaNet's prior-probability initialisation of the output layers re-initialised for our labels (the decode
    head's and the auxiliary head's classifier; a CNN baseline's ``head``): a zero bias starts every class at 0.5
    (sigmoid), and on mostly-background slices the per-pixel loss first drives every feature to "background",
    holding the run at the predict-nothing floor for dozens of steps (benchmarks/learning_efficiency.py measures
    it). A head that already fits our labels (not re-initialised) keeps its bias; a mask-classification model
    (Mask2Former: a class per query plus "no object") is left as it is. Returns the biases set."""
    if model.config.model_type in QUERY_FAMILIES:
        return []
    bias = prior_bias(task, n_classes, prior)
    fresh = {line.split(":")[0] for line in reinitialised}
    everything = any(line.startswith("all weights") for line in reinitialised)  # a CNN baseline, a 3D network
    output = getattr(model, "output_bias", "head.bias")
    done = []
    for name, param in model.named_parameters():
        if name.endswith(".bias") and param.shape == bias.shape and (
                name in fresh or (everything and name == output)):
            with torch.no_grad():
                param.copy_(bias)
            done.append(name)
    return sorted(done)


def load_config(base_model: str, allow_bin: bool = False):
    """The config of ``base_model`` (hub id or folder), refused with one line unless it is a segmentation model
    (any AutoModelForSemanticSegmentation family, a CNN baseline's or a mask-classification one) that loads without
    running its own code (and, for a folder, without unpickling: check_model_folder)."""
    config = read_config(base_model, allow_bin)
    family = config.model_type
    if family not in (*MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES, *BASELINE_FAMILIES, *QUERY_FAMILIES,
                      "gi_volume"):
        raise UserError(f"--base_model {base_model!r} is a {family!r} model, not a semantic-segmentation model; "
                        f"tested families: {sorted(list_families('hub'))}, baselines: {sorted(BASELINES)}, 3D: "
                        f"{sorted(VOLUMES)}")
    return config


def check_base_model(base_model: str, allow_bin: bool = False) -> str:
    """What --base_model is, checked without downloading anything: a CNN baseline, a local folder whose config is a
    segmentation model's, or a hub id (its files are fetched when the run starts). A UserError line otherwise."""
    if base_model in BASELINES:
        return f"{base_model} (a CNN baseline, random weights)"
    if base_model in VOLUMES:
        return f"{base_model} (a 3D network, random weights)"
    if Path(base_model).exists():
        if not (Path(base_model) / "config.json").is_file():
            raise UserError(f"--base_model {base_model}: a local path with no config.json; pass a model folder "
                            "(save_pretrained, or `hf download <id> --local-dir <folder>`), a hub id or a baseline "
                            f"({', '.join(sorted(BASELINES))})")
        return f"{base_model} ({load_config(base_model, allow_bin).model_type})"
    parts = base_model.split("/")
    if len(parts) > 2 or not all(parts) or base_model.startswith((".", "~")):
        raise UserError(f"--base_model {base_model!r}: no such folder, and not a hub id (<owner>/<name>)")
    return f"{base_model} (a hub id: downloaded when the run starts)"


def _load_model(base_model: str, task: str, classes: tuple[str, ...], aux_weight: float = 0.4,
                allow_bin: bool = False, modalities: int = 1) -> LoadedModel:
    id2label = get_task(task).labels(classes)
    if base_model in VOLUMES:
        model = build_volume(base_model, id2label, modalities)
        return LoadedModel(model, "gi_volume", ["all weights (a 3D network starts from random weights)"], (), (), "")
    if base_model in BASELINES:
        model = build_baseline(base_model, id2label)
        return LoadedModel(model, model.config.model_type,
                           ["all weights (a CNN baseline starts from random weights: no pretrained encoder offline)"],
                           IMAGENET_MEAN, IMAGENET_STD, "ImageNet (a CNN baseline's choice)")
    config = load_config(base_model, allow_bin)
    family = config.model_type
    kwargs = {}
    if hasattr(config, "use_auxiliary_head") and aux_weight <= 0:
        kwargs["use_auxiliary_head"] = False  # no aux loss: drop the head, or DDP would see unused parameters
    if family == "gi_volume":  # (an input layer of another width is re-initialised, like the head)
        kwargs["num_channels"] = modalities
    with weights_errors(base_model, allow_bin):
        model, info = auto_class(family).from_pretrained(
            base_model, id2label=id2label, label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True,
            output_loading_info=True, **loading_kwargs(allow_bin), **kwargs)
    mean, std = FAMILY_STATS.get(family, (IMAGENET_MEAN, IMAGENET_STD))
    source = f"the {family} family's" if family in FAMILY_STATS else "ImageNet (no preprocessor config, family untested)"
    return loaded_model(model, family, info, base_model, mean, std, source)


def input_layout(spec) -> dict:
    """What a model's input channels mean, kept in its config.json (giseg_*): a spec that says otherwise (another
    --context_slices of the same channel count) is not this model's (inference/segmenter.check_spec_matches_model)."""
    return {"giseg_context_slices": spec.context_slices, "giseg_context_stride": spec.context_stride}


def save_model(hf_model: nn.Module, out_dir: str | Path, spec, state_dict: dict | None = None,
               card: str | None = None) -> None:
    """``save_pretrained`` (safetensors), the image processor, the inference spec and the model card ``card``
    (README.md), written atomically to ``out_dir``. ``state_dict`` overrides the model's own (the gathered one
    under DeepSpeed / FSDP)."""
    for key, value in input_layout(spec).items():  # the model's own record of what it was trained to see
        setattr(hf_model.config, key, value)
    with atomic_dir(out_dir) as tmp:
        hf_model.save_pretrained(tmp, state_dict=state_dict)
        make_image_processor(spec.image_size, spec.mean, spec.std).save_pretrained(tmp)
        spec.save(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
