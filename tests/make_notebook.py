"""Regenerate visualisation.ipynb (committed without outputs): python tests/make_notebook.py"""
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

cells = [
    new_markdown_cell("# GI-tract segmentation: data, training, predictions\n\n"
                      "Set `RUN_DIR` (a run folder of `giseg train`) and `DATA_DIR` below; by default the newest run "
                      "under `runs/` and its own data folder (the demo run after `bash run_train.sh`). "
                      "The plotting code lives in `giseg/evaluation/figures.py`; `giseg figures --run_dir ... --out "
                      "figures/` writes the same figures as PNGs on a headless server."),
    new_code_cell("import os\nfrom pathlib import Path\n\n"
                  "RUN_DIR = os.environ.get(\"RUN_DIR\") or str(max(Path(\"runs\").glob(\"*/run_config.json\"), "
                  "key=os.path.getmtime).parent)\n"
                  "DATA_DIR = os.environ.get(\"DATA_DIR\")  # None: the run's own data folder\n"
                  "MAX_SLICES = int(os.environ.get(\"MAX_SLICES\", \"0\")) or None  # limit predictions for big folds\n"
                  "print(RUN_DIR)"),
    new_code_cell("%matplotlib inline\nfrom giseg.evaluation import figures as vis\n"
                  "from giseg.utils.log import quiet_third_party\n\nquiet_third_party()\n"
                  "config, adapter = vis.run_adapter(RUN_DIR)  # the run's settings and its dataset's adapter\n"
                  "index = adapter.build_index(DATA_DIR or config[\"data_dir\"])\n"
                  "print(f\"{len(index)} slices, {index['case'].nunique()} cases; model {config['base_model']}, "
                  "task {config['task']}\")"),
    new_markdown_cell("## The data\nClass (organ) frequency, the mix of scan sizes, consecutive slices of one volume "
                      "with the ground truth in the dataset's colours (GI: large bowel red, small bowel green, stomach "
                      "blue), and what the augmentation does to one sample."),
    new_code_cell("vis.class_frequency(adapter, index)"),
    new_code_cell("vis.plot_class_frequency(adapter, index);"),
    new_code_cell("vis.plot_size_mix(index);"),
    new_code_cell("vis.plot_slice_strip(adapter, index);"),
    new_code_cell("vis.plot_augmentations(adapter, index, strong=config.get(\"strong_aug\", False));"),
    new_markdown_cell("## The training\nLoss, per-class validation Dice and learning rate from `metrics.jsonl`; the "
                      "dotted line marks the best epoch (the one saved in `best/`)."),
    new_code_cell("metrics = vis.load_metrics(RUN_DIR)\nvis.plot_training(RUN_DIR);\n"
                  "print('best epoch', vis.best_epoch(metrics))"),
    new_markdown_cell("## The predictions\n`best/` on the run's validation fold, at each scan's original size."),
    new_code_cell("pred = vis.predict_validation(RUN_DIR, DATA_DIR, MAX_SLICES)\n"
                  "print(len(pred.index), 'validation slices')"),
    new_code_cell("vis.plot_predictions(pred);"),
    new_code_cell("for cls in pred.classes:\n"
                  "    if pred.scores[f'dice_{cls}'].notna().any():\n"
                  "        vis.plot_best_worst(pred, cls)"),
    new_code_cell("vis.per_case_table(pred)"),
    new_markdown_cell("Where the true pixels of each organ were predicted: the diagonal is right, off-diagonal cells "
                      "are organs mistaken for one another, the last column is missed."),
    new_code_cell("vis.confusion(pred)"),
    new_code_cell("vis.plot_confusion(pred);"),
]
nb = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                        "language": "python"}})
path = Path(__file__).resolve().parents[1] / "visualisation.ipynb"
nbformat.write(nb, path)
print(path)
