"""giseg: fine-tune Hugging Face segmentation checkpoints on GI-tract MRI (and other 2D/2.5D medical data).

Layers, lowest first; a module imports only its own layer and those below (tests/test_architecture.py checks it):

    utils        one-line user errors, atomic writes, locks, logging, options declared as dataclass fields
    data         datasets (adapters: gi, lgg, hf), run-length codes, masks, preprocessing, decode-once cache, folds
    models       Hugging Face loading with new heads, input widening, tiny configs, CNN baselines (U-Nets, UNeXt)
    inference    the inference spec, Segmenter, ensembles, post-processing, submission rows
    evaluation   metrics, validation, scoring, tuning, comparison, figures
    training     configuration, run folder and identity, checkpoints, signals, losses, EMA, trackers, cards, CV
    commands     one module per `giseg <command>` (cli.py dispatches); trainer.py (top level) is the training loop
"""
