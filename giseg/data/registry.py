"""Dataset adapters: everything that differs between the datasets the toolkit reads, one object per dataset.

    DATASETS["gi"]    UW-Madison GI tract, Kaggle layout (data.py): 3 organs from run-length codes
    DATASETS["lgg"]   LGG brain MRI, kaggle_3m layout (lgg.py): one class, tumor, from mask files
    DATASETS["hf"]    any image-segmentation dataset in Hugging Face ``datasets`` form (hf_data.py); its classes
                      come with the data, so ``adapter.bind(data_dir, options)`` gives the adapter of one dataset

An adapter owns its name, classes, the multiclass overlap priority, display colours, how to build the slice
index from a folder, how to read one image and one slice's masks, which rows form a 3D volume, and its demo
generator. Nothing outside an adapter looks at index columns to decide what the data is. To add a dataset,
subclass ``DatasetAdapter`` and put an instance in ``DATASETS``: the trainer, predict.py, score.py,
visualise.py and the app take it from there (``--dataset`` choices come from this dict).

An index is a DataFrame with one row per slice and at least the columns ``id`` (unique), ``case`` (the unit
of the case-level folds), the ``volume_columns`` (rows sharing them form one volume, ordered by ``slice``),
``slice``, ``width``, ``height`` and ``path``; an adapter adds what its readers need.
"""
from __future__ import annotations

from giseg.data.base import DatasetAdapter
from giseg.data.gi import GIAdapter
from giseg.data.hf import HFAdapter
from giseg.data.lgg import LGGAdapter
from giseg.data.masks import MAX_CLASSES
from giseg.utils import UserError

DATASETS: dict[str, DatasetAdapter] = {"gi": GIAdapter(), "lgg": LGGAdapter(), "hf": HFAdapter()}


def get_adapter(name: str, where: str = "--dataset") -> DatasetAdapter:
    """The registered adapter ``name``; an unknown name is a UserError naming the choices."""
    if name not in DATASETS:
        raise UserError(f"{where}: unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    adapter = DATASETS[name]
    if len(adapter.classes) > MAX_CLASSES or sorted(adapter.priority) != sorted(adapter.classes):
        raise UserError(f"dataset {name!r}: at most {MAX_CLASSES} classes (one bit each in the packed masks), and its "
                        "priority must list each class once")
    return adapter


def datasets_help() -> str:
    return "; ".join(f"{a.name}: {a.description}" for a in DATASETS.values())
