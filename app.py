"""A Gradio page to try a trained model on one scan.

    python app.py --model runs/<name>/best [--data_dir demo/data] [--host 127.0.0.1] [--port 7860]

Upload a scan (a 16-bit PNG as in the competition, or any ordinary image) or pick a slice of the data folder; the
page shows the prediction overlaid (large bowel red, small bowel green, stomach blue), the area of each organ
(pixels, and mm² when the file name carries the pixel spacing), and the Dice against the ground truth when the
slice has one. The server binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from utils import CLASSES, UserError


@dataclass
class Analysis:
    overlay: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (3, H, W) bool
    table: pd.DataFrame  # organ, pixels, area_mm2, dice


class Analyser:
    """Holds a loaded model (and optionally a data folder) and analyses one scan at a time."""

    def __init__(self, model_dir: str | Path, data_dir: str | Path | None = None, device: str | None = None):
        from predict import load_for_inference

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.spec = load_for_inference(model_dir, self.device)
        self.index = None
        if data_dir is not None:
            from data import build_index

            labels = (Path(data_dir) / "train.csv").is_file()
            self.index = build_index(data_dir, labels=labels).set_index("id", drop=False)

    def slice_ids(self, limit: int = 2000) -> list[str]:
        """Slice ids of the data folder, those showing the most organs first (the page opens on the first)."""
        if self.index is None:
            return []
        if f"rle_{CLASSES[0]}" not in self.index:
            return list(self.index["id"][:limit])
        organs = sum(self.index[f"rle_{c}"].astype(str).str.len() > 0 for c in CLASSES).to_numpy()
        order = np.argsort(-organs, kind="stable")
        return list(self.index["id"].to_numpy()[order][:limit])

    def predict(self, image01: np.ndarray) -> np.ndarray:
        """(H, W) or (3, H, W) image in [0, 1] -> (3, H, W) bool organ masks at the same size."""
        from cache import resize_image
        from predict import predict_probs, probs_to_masks

        chans = image01[None] if image01.ndim == 2 else image01
        h, w = chans.shape[-2:]
        small = np.stack([resize_image(c.astype(np.float32), self.spec.image_size) for c in chans])
        if len(small) == 1:
            small = np.repeat(small, 3, axis=0)
        mean = np.asarray(self.spec.mean, np.float32)[:, None, None]
        std = np.asarray(self.spec.std, np.float32)[:, None, None]
        x = torch.from_numpy((small - mean) / std)[None].to(self.device)
        probs = predict_probs(self.model, x, self.spec.task, tta=False)[0]
        thr = torch.full((len(CLASSES),), 0.5, device=self.device)
        return probs_to_masks(probs, (h, w), self.spec.task, thr)

    def analyse_file(self, path: str | Path) -> Analysis:
        """An uploaded scan: a 16-bit PNG (pixel spacing read from a competition file name) or any image."""
        from data import SCAN_RE, normalise_scan, read_scan

        img = read_scan(path)
        m = SCAN_RE.match(Path(path).name)
        spacing = (float(m.group(4)), float(m.group(5))) if m else None
        return self._analyse(normalise_scan(img), None, spacing)

    def analyse_id(self, slice_id: str) -> Analysis:
        """A slice of the data folder, with its 2.5D neighbours and its ground truth when there is one."""
        from cache import slice_masks
        from data import neighbour_table, normalise_scan, read_scan

        if self.index is None or slice_id not in self.index.index:
            raise UserError(f"slice {slice_id!r} is not in the data folder")
        row = self.index.loc[slice_id]
        vol = self.index[(self.index["case"] == row.case) & (self.index["day"] == row.day)].reset_index(drop=True)
        nb = neighbour_table(vol, self.spec.context_slices, self.spec.context_stride)[int(np.flatnonzero(vol["id"] == slice_id)[0])]
        chans = np.stack([normalise_scan(read_scan(vol.at[int(k), "path"])) for k in nb])
        truth = slice_masks(row).astype(bool) if f"rle_{CLASSES[0]}" in row else None
        return self._analyse(chans if len(chans) > 1 else chans[0], truth, (row.spacing_x, row.spacing_y))

    def _analyse(self, image01: np.ndarray, truth: np.ndarray | None, spacing) -> Analysis:
        from visualise import overlay

        masks = self.predict(image01)
        centre = image01 if image01.ndim == 2 else image01[len(image01) // 2]
        rows = []
        for c, name in enumerate(CLASSES):
            px = int(masks[c].sum())
            dice = None
            if truth is not None:
                denom = masks[c].sum() + truth[c].sum()
                dice = 1.0 if denom == 0 else float(2 * (masks[c] & truth[c]).sum() / denom)
            rows.append({"organ": name, "pixels": px,
                         "area_mm2": round(px * spacing[0] * spacing[1], 1) if spacing else None,
                         "dice": None if dice is None else round(dice, 4)})
        rgb = (overlay(centre, masks) * 255).round().astype(np.uint8)
        return Analysis(rgb, masks, pd.DataFrame(rows))


def build_demo(analyser: Analyser):
    import gradio as gr

    ids = analyser.slice_ids()
    with gr.Blocks(title="GI-tract segmentation") as demo:
        gr.Markdown("## GI-tract organ segmentation\nLarge bowel **red**, small bowel **green**, stomach **blue**. "
                    "Upload a scan (16-bit PNG or an ordinary image) or pick a slice of the data folder.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="scan file", file_types=["image"])
                pick = gr.Dropdown(choices=ids, value=ids[0] if ids else None, label="or a slice of the data folder",
                                   visible=bool(ids))
            with gr.Column():
                image = gr.Image(label="prediction", type="numpy", elem_id="overlay")
                table = gr.Dataframe(label="organs", elem_id="areas")

        def from_file(f):
            if f is None:
                return gr.update(), gr.update()
            a = analyser.analyse_file(f if isinstance(f, str) else f.name)
            return a.overlay, a.table

        def from_id(slice_id):
            if not slice_id:
                return gr.update(), gr.update()
            a = analyser.analyse_id(slice_id)
            return a.overlay, a.table

        upload.change(from_file, upload, [image, table])
        pick.change(from_id, pick, [image, table])
        if ids:
            demo.load(from_id, pick, [image, table])  # the first slice is shown as soon as the page opens
    return demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved model folder (runs/<name>/best)")
    ap.add_argument("--data_dir", default=None, help="a Kaggle-layout folder to pick slices from")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    args = ap.parse_args(argv)
    from utils import quiet_third_party

    quiet_third_party()
    try:
        analyser = Analyser(args.model, args.data_dir)
    except UserError as e:
        print(f"error: {e}")
        return 2
    build_demo(analyser).launch(server_name=args.host, server_port=args.port, share=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
