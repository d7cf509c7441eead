"""Inference: the spec saved with every model, the Segmenter, ensembles, post-processing, submissions."""
