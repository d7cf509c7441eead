"""Save a small random model of a real architecture (150 ADE-like labels), for offline tries and the tests.

    giseg make-tiny --family segformer --out demo/models/tiny-segformer [--width 2] [--seed 0]

The folder is a ``save_pretrained`` folder of the family's own class (SegFormer, UperNet-ConvNeXt, DPT, BEiT,
Mask2Former; or ConvNeXt, Swin, EfficientNet image classifiers for --task presence) with an image-processor
config: ``--base_model <folder>`` fine-tunes it as it would a hub checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from giseg.models.registry import list_families
from giseg.utils.exits import command
from giseg.utils.log import quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg make-tiny", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", required=True, choices=[name for kind in ("hub", "classifier", "volume")
                                                        for name in sorted(list_families(kind, tiny=True))],
                    help="architecture family (*-classifier: an image classifier, for --task presence; *3d: a 3D "
                    "network, the [3d] extra)")
    ap.add_argument("--out", required=True, help="folder to write")
    ap.add_argument("--width", type=int, default=1, help="channel multiplier (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    return ap


@command
def main(argv: list[str] | None = None) -> None:
    from giseg.models.tiny import make_tiny  # transformers (4 s): not for --help

    args = build_parser().parse_args(argv)
    quiet_third_party()  # no "Writing model shards" progress bar
    earlier = (Path(args.out) / "config.json").is_file()  # (claimed inside: only an earlier make-tiny's is replaced)
    out = make_tiny(args.family, args.out, args.width, args.seed)
    print(f"{out}" + (" (replaced the earlier tiny model there)" if earlier else ""))
