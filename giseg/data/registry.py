"""Dataset adapters: everything that differs between the datasets the toolkit reads, one object per dataset.

    DATASETS["gi"]    UW-Madison GI tract, Kaggle layout (data/gi.py): 3 organs from run-length codes
    DATASETS["lgg"]   LGG brain MRI, kaggle_3m layout (data/lgg.py): one class, tumor, from mask files
    DATASETS["hf"]    any image-segmentation dataset in Hugging Face ``datasets`` form (data/hf/); its classes
                      come with the data, so ``adapter.bind(data_dir, options)`` gives the adapter of one dataset
    DATASETS["nnunet"] an nnU-Net raw dataset (data/nnunet/): NIfTI volumes, classes from its dataset.json

An adapter owns its name, classes, the multiclass overlap priority, display colours, how to build the slice
index from a folder, how to read one image and one slice's masks, which rows form a 3D volume, and its demo
generator. Nothing outside an adapter looks at index columns to decide what the data is. To add a dataset, write
one module with a ``DatasetAdapter`` subclass (base.py) and add one line to ``DATASETS``: the trainer, giseg
predict, score, tune, cv, the figures and the app take it from there (``--dataset`` choices come from this dict).

An index is a DataFrame with one row per slice and at least the columns ``id`` (unique), ``case`` (the unit
of the case-level folds), the ``volume_columns`` (rows sharing them form one volume, ordered by ``slice``),
``slice``, ``width``, ``height`` and ``path``; an adapter adds what its readers need.
"""
from __future__ import annotations

import importlib

from giseg.data.base import DatasetAdapter
from giseg.data.masks import MAX_CLASSES
from giseg.utils.errors import UserError

# name -> "module:class" of its adapter; a new dataset is one module (a DatasetAdapter subclass) and one line here
ADAPTERS = {
    "gi": "giseg.data.gi:GIAdapter",
    "lgg": "giseg.data.lgg:LGGAdapter",
    "hf": "giseg.data.hf.adapter:HFAdapter",
    "nnunet": "giseg.data.nnunet.adapter:NnUNetAdapter",
}


def _instance(ref: str) -> DatasetAdapter:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)()


DATASETS: dict[str, DatasetAdapter] = {name: _instance(ref) for name, ref in ADAPTERS.items()}


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
