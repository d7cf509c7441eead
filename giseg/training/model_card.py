"""Model cards (``README.md`` in every best/ and last/ folder) in the Hub's format, and ``--push_to_hub``.

The card's YAML metadata carries the base model, ``library_name: transformers``, ``pipeline_tag:
image-segmentation``, tags, and a ``model-index`` with the validation fold's per-class Dice, its mean and, after
``--final_eval``, the competition score; the text says what it was trained on, with which hyper-parameters,
how empty slices are scored, how to run it, and where it stops being valid. huggingface_hub writes the metadata
(``ModelCardData``) and reads it back (``ModelCard.load``), as the Hub does.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from giseg.data.registry import DATASETS
from giseg.models.baselines import BASELINE_FAMILIES
from giseg.models.families import QUERY_FAMILIES
from giseg.models.tasks import get_task
from giseg.training.config import TrainConfig
from giseg.utils.log import logger

# the card's hyper-parameter table: the TrainConfig fields declared with "card": True
HYPER_PARAMETERS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("card"))
EMPTY_RULE = {"1": "scores 1 (the 1st-place solution's rule; the default)",
              "0": "scores 0 (the competition text's rule)",
              "skip": "is left out of the mean (as a public grader does)"}


def hub_id(text: str) -> str | None:
    """``text`` if it names a hub repo (owner/name, not a local path), else None."""
    parts = str(text).split("/")
    return text if len(parts) == 2 and all(parts) and not Path(text).exists() else None


def card_results(record: dict, classes: list, scores: dict | None) -> list[tuple[str, str, float]]:
    """(name, metric type, value) rows of the card: per-class Dice (or a classifier's AUC/F1) of ``record``, and the
    competition score of ``scores`` (val_scores.json) when --final_eval gave one."""
    results = [(f"Dice {c}", "dice", record[f"dice_{c}"]) for c in classes] if "dice_mean" in record else []
    if results:
        results.append(("mean Dice", "dice", record["dice_mean"]))
    if "auc_mean" in record:
        results = [(f"AUC {c}", "roc_auc", record[f"auc_{c}"]) for c in classes]
        results += [("mean AUC", "roc_auc", record["auc_mean"]), ("mean F1 at the thresholds", "f1", record["f1_mean"]),
                    ("empty slices called empty", "accuracy", record["empty_correct"])]
    if scores:
        results += [("competition score (0.4 Dice + 0.6 (1 - 3D Hausdorff), original sizes)", "score",
                     scores["score"]), ("3D Hausdorff (normalised)", "hausdorff", scores["hausdorff"])]
    return results


def card_metadata(*, config: dict, spec, family: str, results: list, data_name: str, split: str):
    """The card's YAML metadata (huggingface_hub's ``ModelCardData``), with a ``model-index`` of ``results``."""
    from huggingface_hub import EvalResult, ModelCardData  # huggingface_hub: only when a model is saved

    task_type, task_name = (("image-classification", "Slice presence (multi-label)") if not get_task(spec.task).segments else
                            ("image-segmentation", "Semantic segmentation"))
    evals = [EvalResult(task_type=task_type, task_name=task_name, dataset_type=spec.dataset,
                        dataset_name=data_name, dataset_split=split, metric_type=kind, metric_name=name,
                        metric_value=round(float(value), 6)) for name, kind, value in results
             if value == value]  # (an AUC of a class the fold does not vary in is NaN)
    return ModelCardData(base_model=hub_id(config["base_model"]), library_name="transformers", pipeline_tag=task_type,
                         tags=[task_type, "medical-imaging", "mri", family, f"dataset-{spec.dataset}", spec.task],
                         model_name=Path(config["output_dir"]).name, eval_results=evals or None, license=None)


def _query_usage(spec, family: str, repo: str) -> str:
    classes = ", ".join(spec.classes)
    return f"""```python
import numpy as np
from giseg.inference.segmenter import Segmenter  # pip install -e <this toolkit>; a hub repo: snapshot_download first

seg = Segmenter.load("{repo}")  # the {family} model with its inference spec
scan = np.random.default_rng(0).random((266, 266), dtype=np.float32)  # one raw slice, (H, W)
masks = seg.masks(seg.logits(seg.prepare([scan])), scan.shape)  # (1, {len(spec.classes)}, H, W) bool: {classes}
```"""


def _volume_usage(spec, family: str, repo: str) -> str:
    classes = ", ".join(spec.classes)
    return f"""```python
import numpy as np
from giseg.inference.segmenter import Segmenter  # pip install -e '<this toolkit>[3d]'; a hub repo: snapshot_download

seg = Segmenter.load("{repo}")  # the 3D model with its inference spec (patch {spec.patch_size})
rng = np.random.default_rng(0)
volume = [rng.random((266, 266), dtype=np.float32) for _ in range(40)]  # a scan's raw slices, in slice order
logits = seg.logits(seg.prepare_volume(volume))  # (40, K, S, S): MONAI's sliding window over the whole volume
masks = seg.masks(logits, volume[0].shape)  # (40, {len(spec.classes)}, H, W) bool, per slice: {classes}
```"""


def card_usage(spec, family: str, repo: str) -> str:
    """The card's "How to use" code: transformers' Auto classes, or the toolkit's Segmenter for a query family
    or a 3D model (its sliding window)."""
    presence, classes = not get_task(spec.task).segments, ", ".join(spec.classes)
    if family in QUERY_FAMILIES and not presence:  # per-class maps from its queries: the toolkit turns them to masks
        return _query_usage(spec, family, repo)
    if spec.patch_size:
        return _volume_usage(spec, family, repo)
    if presence:
        register = ("import giseg.models.classifier  # registers the CNN encoder classifier with the Auto classes\n"
                    if family == "gi_encoder" else "")
        auto = "AutoModelForImageClassification"
        outputs = (f"    present = model(**inputs).logits.sigmoid()[0] > torch.tensor({list(spec.thresholds)})  "
                   f"# {classes}\n```\nOr gate a segmenter with it: `giseg predict --model <segmenter> "
                   f"--gate_model {repo} ...` (docs/competition.md).")
    else:
        register = (f"import giseg.models.baselines  # registers the {family} architecture with the Auto classes\n"
                    if family in BASELINE_FAMILIES else "")
        auto = "AutoModelForSemanticSegmentation"
        decode = (f"probs = logits.sigmoid()[0]\nmasks = probs > torch.tensor({list(spec.thresholds)}).view(-1, 1, 1)"
                  f"  # ({len(spec.classes)}, H, W): {classes}" if not get_task(spec.task).background else
                  f"masks = logits.argmax(1)[0]  # (H, W): 0 background, 1.. {classes}")
        outputs = ("    logits = model(**inputs).logits\nlogits = torch.nn.functional.interpolate(logits, "
                   f"size=scan.shape, mode=\"bilinear\", align_corners=False)\n{decode}\n```")
    context = "the slice in every channel" if spec.context_slices == 1 else "slices i-k*stride .. i+k*stride (2.5D)"
    return f"""```python
import numpy as np
import torch
from transformers import AutoImageProcessor, {auto}
{register}
repo = "{repo}"
processor = AutoImageProcessor.from_pretrained(repo)
model = {auto}.from_pretrained(repo).eval()
scan = np.random.default_rng(0).random((266, 266), dtype=np.float32)  # one slice scaled to [0, 1]
channels = np.repeat(scan[..., None], {max(3, spec.context_slices)}, axis=-1)  # {context}
inputs = processor(images=channels, return_tensors="pt")
with torch.no_grad():
{outputs}"""


def card_results_text(spec, record: dict, results: list, scores: dict | None) -> str:
    """The card's "Results" section: the figures table and the competition-score line."""
    if not results:
        return ("## Results\nNone: this model was trained on every case (`--fold -1`), with no validation set; the "
                "cross-validation of the same settings (giseg cv) gives its expected figures.")
    presence = not get_task(spec.task).segments
    figures = "\n".join(f"| {name} | {value:.4f} |" for name, _, value in results)
    score_line = (f"Competition score at original sizes (`--final_eval`): **{scores['score']:.4f}** "
                  f"(3D Hausdorff {scores['hausdorff']:.4f})." if scores else
                  "The competition score needs the 3D Hausdorff distance at original sizes: train with "
                  "`--final_eval` (or run `giseg score` on this model's predictions) to get it.")
    if presence:
        score_line = ("The gate's effect on a segmenter's competition score: giseg tune --gate_model (it adopts "
                      "the gate only where the score rises).")
    return f"""## Results on the validation fold
At the training size, {"per-class presence figures over slices" if presence else
                       "per-slice Dice averaged over slices"} (step {record['step']}, epoch {record['epoch']}):

| figure | value |
| --- | --- |
{figures}

{score_line}"""


def card_text(*, config: dict, spec, record: dict, family: str, split_sizes: dict, scores: dict | None,
              repo: str, what: str) -> str:
    """The README.md of a model folder: ``record`` is the evaluation the folder's weights had (a metrics.jsonl
    row), ``scores`` val_scores.json (None before --final_eval), ``repo`` what the usage code loads from."""
    dataset, classes = spec.dataset, list(spec.classes)
    adapter = DATASETS.get(dataset)
    data_name = adapter.title if adapter is not None and adapter.title else f"{config['data_dir']} ({dataset} dataset)"
    split = (f"validation fold {config['fold']} of {config['n_folds']} (case-level, seed {config['split_seed']})"
             if config["fold"] >= 0 else "every case (--fold -1: no validation set)")
    results = card_results(record, classes, scores)
    meta = card_metadata(config=config, spec=spec, family=family, results=results, data_name=data_name, split=split)
    hp = "\n".join(f"| `--{k}` | {config[k]} |" for k in HYPER_PARAMETERS if k in config)
    thresholds = ", ".join(f"{c} {t}" for c, t in zip(classes, spec.thresholds)) or "argmax"
    purpose = ("slice presence (is each class on the slice)" if not get_task(spec.task).segments else
               f"{spec.task} segmentation")
    limits = (adapter.limits if adapter is not None and adapter.limits else
              f"{data_name} only, classes: " + ", ".join(classes) + ".")
    body = f"""
# {Path(config['output_dir']).name}: {family} for {', '.join(classes)} ({what}/)

`{config['base_model']}` fine-tuned for {purpose} of {', '.join(classes)} on {data_name}, with a
new head for these classes. These are the `{what}/` weights of the run: the evaluation of step {record['step']}
(epoch {record['epoch']}).

## Training data and split
- Data: `{config['data_dir']}` (dataset adapter `{dataset}`), {split_sizes['slices']} slices of
  {split_sizes['cases']} cases.
- Split: {split}: {split_sizes['train']} training slices, {split_sizes['val']} validation slices; no case is in both.
- Input: {spec.image_size} x {spec.image_size} px, each slice scaled to [0, 1] between its 0.5th and 99.5th
  intensity percentiles, normalised with mean {list(spec.mean)} and std {list(spec.std)};
  {spec.context_slices} slice(s) of context (stride {spec.context_stride}). Thresholds: {thresholds}.

## Hyper-parameters
| argument | value |
| --- | --- |
{hp}

{card_results_text(spec, record, results, scores)}

Empty slices: a (slice, class) pair whose prediction and ground truth are both empty
{EMPTY_RULE.get(str(config.get('empty_dice', '1')), '')} (`--empty_dice {config.get('empty_dice', '1')}`).

## How to use
{card_usage(spec, family, repo)}

## Limits
Trained and validated on {limits}
Figures come from one validation fold of the training data, not from an independent test set. A research
model, not a medical device: every contour needs a clinician's review.
"""
    return f"---\n{meta.to_yaml()}\n---\n{body}"


def push_folder(folder: Path, repo_id: str, private: bool) -> bool:
    """Upload ``folder`` to the model repo ``repo_id`` with huggingface_hub's API. Never raises: a failure (no
    network, no token, offline mode) is one warning line saying how to push the folder later."""
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {folder.name}/ of {folder.parent.name}")
    except Exception as e:  # noqa: BLE001 -- the run is saved; pushing is the last, optional step
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        logger.warning("push to the Hub failed (%s: %s); everything is saved in %s. Push it later with: "
                       "hf upload %s %s .%s", type(e).__name__, reason, folder, repo_id, folder,
                       " --private" if private else "")
        return False
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
    return True
