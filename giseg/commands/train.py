"""`giseg train`: the training loop (giseg/training/loop.py); every flag is a TrainConfig field
(giseg/training/config.py). `python trainer.py` in the checkout and `accelerate launch -m giseg train` are the same."""
from giseg.training.config import build_parser  # noqa: F401  (the parser: giseg flags reads it from every command)
from giseg.training.loop import main  # noqa: F401
