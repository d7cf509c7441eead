"""Fine-tune a Hugging Face segmentation model on GI-tract MRI: the training loop is giseg/training/loop.py.

    python trainer.py --help                                 every flag (the same as: giseg train --help)
    python trainer.py --base_model <hub id or folder> --data_dir <kaggle folder> --output_dir runs/x
    accelerate launch --multi_gpu --num_processes 2 trainer.py ...      (or: GPUS=0,1 bash run_train.sh)
"""
import sys

from giseg.training.loop import main, train  # noqa: F401  (train: the loop as a function, for notebooks and tests)

if __name__ == "__main__":
    sys.exit(main())
