"""A Gradio page to try a trained model on one scan.

    giseg app --model runs/<name>/best [--data_dir demo/data] [--host 127.0.0.1] [--port 7860]

Upload a scan (a 16-bit PNG as in the competition, or any ordinary image) or pick a slice of the data folder; the
page shows the prediction overlaid in the dataset's colours (GI: large bowel red, small bowel green, stomach blue),
the area of each class (pixels, and mm² when the pixel spacing is known, e.g. from a competition file name), and
the Dice against the ground truth when the slice has one. The model's inference spec says which dataset it reads.
The server binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from giseg.data.preprocess import normalise_scan
from giseg.data.registry import get_adapter
from giseg.data.volumes import neighbour_table
from giseg.evaluation.figures import class_colours, overlay
from giseg.evaluation.metrics import dice_from_stats, mask_stats
from giseg.inference.segmenter import Segmenter
from giseg.utils.errors import UserError
from giseg.utils.exits import command
from giseg.utils.log import quiet_third_party


@dataclass
class Analysis:
    overlay: np.ndarray  # (H, W, 3) uint8
    masks: np.ndarray  # (C, H, W) bool
    table: pd.DataFrame  # organ (the class), pixels, area_mm2, dice


class Analyser:
    """Holds a loaded model (and optionally a data folder of its dataset) and analyses one scan at a time, through
    the same Segmenter path as giseg predict and the trainer's evaluation."""

    def __init__(self, model_dir: str | Path, data_dir: str | Path | None = None, device: str | None = None):
        self.segmenter = Segmenter.load(model_dir, device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.spec = self.segmenter.spec
        self.adapter = get_adapter(self.spec.dataset, f"--model {model_dir}").bind(
            data_dir, self.spec.dataset_options, self.spec.classes)
        self.index = None
        if data_dir is not None:
            self.index = self.adapter.build_index(data_dir, require_labels=False).set_index("id", drop=False)

    def slice_ids(self, limit: int = 2000) -> list[str]:
        """Slice ids of the data folder, those showing the most classes first (the page opens on the first)."""
        if self.index is None:
            return []
        if not self.adapter.has_labels(self.index):
            return list(self.index["id"][:limit])
        shown = self.adapter.presence(self.index).sum(axis=1).to_numpy()
        return list(self.index["id"].to_numpy()[np.argsort(-shown, kind="stable")][:limit])

    def predict(self, raw_channels: list[np.ndarray], at: int = 0) -> np.ndarray:
        """Raw (H, W) scans of one slice (itself, or its 2.5D neighbours; a 3D model: its volume's slices, ``at``
        the one shown) -> (C, H, W) bool masks at that size."""
        m = self.spec.channels
        box = self.segmenter.body_box(raw_channels[at * m])  # (--body_crop: the shown slice's own box)
        with torch.no_grad():
            if self.spec.patch() is not None:
                logits = self.segmenter.logits(self.segmenter.prepare_volume(raw_channels, box))[at:at + 1]
            else:
                logits = self.segmenter.logits(self.segmenter.prepare(raw_channels, box))
        size = raw_channels[0].shape
        return self.segmenter.masks(self.segmenter.paste(logits, size, box), size)[0].cpu().numpy()

    def analyse_file(self, path: str | Path) -> Analysis:
        """An uploaded scan: a 16-bit PNG (pixel spacing read from a competition file name) or any image."""
        if self.spec.channels > 1:
            raise UserError(f"this model takes images of {self.spec.channels} channels; an uploaded file is one: pick "
                            "a slice of the data folder instead")
        img, spacing = self.adapter.read_upload(path)
        return self._analyse([img], None, spacing)

    def analyse_id(self, slice_id: str) -> Analysis:
        """A slice of the data folder, with its 2.5D neighbours and its ground truth when there is one."""
        if self.index is None or slice_id not in self.index.index:
            raise UserError(f"slice {slice_id!r} is not in the data folder")
        row = next(self.index.loc[[slice_id]].itertuples())
        keys = list(self.adapter.volume_columns)
        vol = self.index[(self.index[keys] == self.index.loc[slice_id, keys]).all(axis=1)].reset_index(drop=True)
        here = int(np.flatnonzero(vol["id"] == slice_id)[0])
        if self.spec.patch() is not None:  # a 3D model sees the whole volume, in slice order
            order = np.argsort(vol["slice"].to_numpy(), kind="stable")
            chosen, centre = order, int(np.flatnonzero(order == here)[0])
        else:
            chosen = neighbour_table(vol, self.spec.context_slices, self.spec.context_stride,
                                     self.adapter.volume_columns)[here]
            centre = len(chosen) // 2
        images = [self.adapter.read_image(next(vol.iloc[[int(k)]].itertuples())) for k in chosen]
        chans = [c for img in images for c in (img if img.ndim == 3 else [img])]  # each slice's image channels
        truth = self.adapter.read_masks(row).astype(bool) if self.adapter.has_labels(self.index) else None
        return self._analyse(chans, truth, self.adapter.pixel_spacing(row), centre)

    def _analyse(self, raw_channels: list[np.ndarray], truth: np.ndarray | None, spacing,
                 at: int = 0) -> Analysis:
        masks = self.predict(raw_channels, at)
        m = self.spec.channels  # (the shown slice's first image channel)
        centre = normalise_scan(raw_channels[at * m])
        dice = dice_from_stats(mask_stats(masks, truth), "1") if truth is not None else None
        rows = []
        for c, name in enumerate(self.spec.classes):
            px = int(masks[c].sum())
            rows.append({"organ": name, "pixels": px,
                         "area_mm2": round(px * spacing[0] * spacing[1], 1) if spacing else None,
                         "dice": None if dice is None else round(float(dice[c]), 4)})
        rgb = (overlay(centre, masks, class_colours(self.adapter)) * 255).round().astype(np.uint8)
        return Analysis(rgb, masks, pd.DataFrame(rows))


def shown_on_page(handler):
    """Our one-line message (a bad upload, an unknown slice) in Gradio's error box instead of its generic 'Error'."""
    import functools

    import gradio as gr

    @functools.wraps(handler)
    def run(*args):
        try:
            return handler(*args)
        except UserError as e:
            raise gr.Error(str(e)) from None
    return run


def build_demo(analyser: Analyser):
    import gradio as gr

    ids = analyser.slice_ids()
    adapter = analyser.adapter
    legend = ", ".join(f"{c.replace('_', ' ')} **{adapter.colours[c]}**" for c in adapter.classes)
    # analytics off: a medical-imaging page sends nothing anywhere (gradio would report usage by default)
    with gr.Blocks(title=f"{adapter.name} segmentation", analytics_enabled=False) as demo:
        gr.Markdown(f"## {adapter.description}\n{legend}. Upload a scan or pick a slice of the data folder.")
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="scan file", file_types=["image"])
                pick = gr.Dropdown(choices=ids, value=ids[0] if ids else None, label="or a slice of the data folder",
                                   visible=bool(ids))
            with gr.Column():
                image = gr.Image(label="prediction", type="numpy", elem_id="overlay")
                table = gr.Dataframe(label="organs", elem_id="areas")

        @shown_on_page
        def from_file(f):
            if f is None:
                return gr.update(), gr.update()
            a = analyser.analyse_file(f if isinstance(f, str) else f.name)
            return a.overlay, a.table

        @shown_on_page
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(allow_abbrev=False, prog="giseg app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="saved model folder (runs/<name>/best)")
    ap.add_argument("--data_dir", default=None, help="a Kaggle-layout folder to pick slices from")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    return ap


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party()
    analyser = Analyser(args.model, args.data_dir)
    demo = build_demo(analyser)
    print(f"serving {args.model} on http://{args.host}:{args.port} (Ctrl-C stops it)", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=False, quiet=True)  # quiet: no share=True hint
    return 0
