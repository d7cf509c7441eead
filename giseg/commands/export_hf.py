"""Export a dataset of this toolkit (GI in the Kaggle layout, LGG, ...) as a Hugging Face ``datasets`` folder.

    giseg export-hf --data_dir demo/data --out exports/gi-demo              # save_to_disk folder
    giseg export-hf --data_dir <kaggle folder> --out exports/gi --push_to_hub me/uw-madison-gi [--private]

One row per slice: ``id``, ``case``, ``day``, ``slice``, ``width``, ``height``, ``spacing_x``, ``spacing_y`` (mm),
``image`` (the scan as stored: 16-bit PNG for GI) and one mask image per class (``mask_large_bowel``, ...;
multi-label, 0/255, so overlapping organs stay overlapping), with ``id2label.json`` beside the data. The folder
trains as it is: ``python trainer.py --dataset hf --data_dir exports/gi-demo`` (same index, masks and losses as
training on the Kaggle folder with the same seed). A push that fails (no network, no token) leaves the folder
and says how to push it later.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from giseg.data.registry import DATASETS, datasets_help, get_adapter
from giseg.utils.claims import claim_output_dir
from giseg.utils.exits import command, stop_on_signals
from giseg.utils.log import logger, setup_logging


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg export-hf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="gi", choices=[n for n in DATASETS if n != "hf"],
                    help=f"the layout of --data_dir: {datasets_help()} (default: gi)")
    ap.add_argument("--data_dir", default="demo/data", help="the data folder (default: demo/data)")
    ap.add_argument("--split", default=None, help="a sub-folder where the layout has several (GI: train, the default)")
    ap.add_argument("--out", required=True, help="the datasets folder to write: new, empty, or an earlier export (replaced atomically); a folder "
                         "holding anything else is refused")
    ap.add_argument("--push_to_hub", default="", metavar="REPO_ID", help="also upload it as this Hub dataset repo")
    ap.add_argument("--private", action="store_true", help="create the --push_to_hub repo private")
    return ap


def push_dataset(folder: Path, repo_id: str, private: bool) -> bool:
    """``Dataset.push_to_hub`` of the saved folder, plus its id2label.json; a failure is one warning line."""
    try:
        import datasets
        from huggingface_hub import HfApi

        datasets.load_from_disk(str(folder)).push_to_hub(repo_id, private=private)
        HfApi().upload_file(path_or_fileobj=str(folder / "id2label.json"), path_in_repo="id2label.json",
                            repo_id=repo_id, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 -- the export is saved; pushing is optional
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        logger.warning("push to the Hub failed (%s: %s); the dataset is saved in %s. Push it later with: "
                       "python -c \"import datasets; datasets.load_from_disk('%s').push_to_hub('%s'%s)\" && "
                       "hf upload %s %s/id2label.json id2label.json --repo-type dataset",
                       type(e).__name__, reason, folder, folder, repo_id, ", private=True" if private else "", repo_id,
                       folder)
        return False
    logger.info("pushed %s to https://huggingface.co/datasets/%s", folder, repo_id)
    return True


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    claim_output_dir(args.out, "--out", "export-hf", {"--data_dir": args.data_dir}, create=False,
                     ours=lambda p: (p / "id2label.json").is_file() and (p / "state.json").is_file())
    from giseg.data.hf.export import export_dataset  # `datasets` (slow): only when exporting

    with stop_on_signals():  # SIGTERM / SIGINT: temporary folders removed, one line, exit 128 + signal
        export_dataset(get_adapter(args.dataset), args.data_dir, args.out, args.split)
    if args.push_to_hub:
        push_dataset(Path(args.out), args.push_to_hub, args.private)
    return 0
