"""Datasets and the data path: adapters (registry.py), readers, masks, preprocessing, cache, folds."""
