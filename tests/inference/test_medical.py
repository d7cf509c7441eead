"""giseg predict --input: NIfTI and DICOM volumes in, NIfTI label volumes and a DICOM RT-Struct out."""
import random

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")

from giseg.data.gi import GIAdapter  # noqa: E402
from giseg.data.medical import find_inputs, read_dicom_series, read_nifti  # noqa: E402
from giseg.data.rle import decode_rle  # noqa: E402
from giseg.inference.medical import fill_contours, mask_contours, read_rtstruct  # noqa: E402
from giseg.utils.errors import UserError  # noqa: E402

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_series(folder, slices, spacing=(1.5, 1.5), thickness=3.0, origin=(-120.0, -90.0, 40.0), seed=0):
    """A DICOM MR series of (H, W) uint16 ``slices`` (in order of position, feet to head), as a scanner writes one:
    orientation, positions, spacing and UIDs; file names and instance numbers shuffled, so only the positions
    give the order."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = random.Random(seed)
    numbers = list(range(1, len(slices) + 1))
    rng.shuffle(numbers)
    uids = []
    for k, pixels in enumerate(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = "MR", "Demo^Patient", "GISEG-0001"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.SeriesNumber, ds.InstanceNumber = 3, numbers[k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # (between rows, between columns)
        ds.SliceThickness = thickness
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(pixels, np.uint16).tobytes()
        name = f"{rng.getrandbits(40):010x}.dcm"
        pydicom.dcmwrite(folder / name, ds, enforce_file_format=True)
        uids.append(ds.SOPInstanceUID)
    return uids


@pytest.fixture(scope="module")
def series(demo_dir, tmp_path_factory):
    """A case-day of the demo with non-square scans (360 wide, 310 high) as a DICOM series, and its index rows."""
    gi = GIAdapter()
    index = gi.build_index(demo_dir)
    first = index[index["width"] != index["height"]].iloc[0]
    rows = index[(index["case"] == first["case"]) & (index["day"] == first["day"])]
    folder = tmp_path_factory.mktemp("dicom") / "series"
    spacing = (float(rows["spacing_x"].iloc[0]), float(rows["spacing_y"].iloc[0]))
    uids = write_series(folder, [gi.read_image(r) for r in rows.itertuples()], spacing)
    return folder, rows, uids


def test_a_dicom_series_is_read_in_position_order_with_its_geometry(series):
    folder, rows, uids = series
    volume = read_dicom_series(folder)
    gi = GIAdapter()
    assert volume.array.shape == (rows["width"].iloc[0], rows["height"].iloc[0], len(rows))  # (I = columns, J, K)
    for k, r in enumerate(rows.itertuples()):
        assert np.array_equal(volume.array[:, :, k].T, gi.read_image(r))
    assert [s.sop_instance_uid for s in volume.dicom.slices] == uids
    assert rows["width"].iloc[0] != rows["height"].iloc[0]
    # voxel (i, j, k) -> RAS: LPS of the first pixel, flipped in x and y; slices along +z
    assert np.allclose(volume.affine[:3, 3], [120.0, 90.0, 40.0])
    assert np.allclose(np.diag(volume.affine)[:3], [-rows["spacing_x"].iloc[0], -rows["spacing_y"].iloc[0], 3.0])
    assert volume.spacing[2] == pytest.approx(3.0)


def test_predicting_a_dicom_series_writes_nifti_and_an_rtstruct_that_read_back_to_the_same_masks(
        series, tracked_run, tmp_path, demo_dir):
    from giseg.commands.predict import main as predict

    from giseg.inference.ensemble import Ensemble

    folder, rows, uids = series
    # tracked_run's model has trained 12 steps: its probabilities are near its head's prior everywhere. Thresholds at
    # their 70th percentile on these slices draw regions of every shape (holes, islands, pinch points) on every class
    model = Ensemble.load([tracked_run / "best"])
    index = GIAdapter().build_index(demo_dir)
    probs = np.stack([p for _, p in model.iter_probabilities(
        index, rows.index.to_numpy(), model.inputs(GIAdapter(), index, tmp_path / "cache"))], 1)
    thresholds = ",".join(repr(float(np.quantile(p, 0.7))) for p in probs)
    out = tmp_path / "pred"
    assert predict(["--model", str(tracked_run / "best"), "--input", str(folder), "--out", str(out), "--thresholds",
                    thresholds, "--volume_labels", "per_class", "--cache_dir", str(tmp_path / "cache")]) == 0
    volume = read_dicom_series(folder)
    classes = GIAdapter.classes
    nifti = {c: nib.load(out / folder.name / f"{c}.nii.gz") for c in classes}
    for c, img in nifti.items():
        assert img.shape == volume.array.shape and np.allclose(img.affine, volume.affine)
    masks = {c: np.asanyarray(img.dataobj).astype(bool) for c, img in nifti.items()}
    assert all(m.any() for m in masks.values()), {c: int(m.sum()) for c, m in masks.items()}

    # the same slices through the submission path (the Kaggle folder): the same masks, so the volume's
    # orientation and width/height order are the scans'
    sub = tmp_path / "sub.csv"
    assert predict(["--model", str(tracked_run / "best"), "--data_dir", str(demo_dir), "--out", str(sub),
                    "--thresholds", thresholds, "--cache_dir", str(tmp_path / "cache")]) == 0
    import pandas as pd

    table = pd.read_csv(sub, keep_default_na=False).set_index(["id", "class"])["predicted"]
    for k, r in enumerate(rows.itertuples()):
        for c in classes:
            assert np.array_equal(decode_rle(table[(r.id, c)], (r.height, r.width)).astype(bool), masks[c][:, :, k].T)

    # the RT-Struct: one ROI per class with its colour, contours on the series' own images, read back equal
    rt = pydicom.dcmread(out / f"{folder.name}_rtstruct.dcm")
    assert rt.Modality == "RTSTRUCT" and rt.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert rt.StudyInstanceUID == pydicom.dcmread(next(folder.iterdir())).StudyInstanceUID
    assert rt.PatientID == "GISEG-0001"
    assert [r.ROIName for r in rt.StructureSetROISequence] == list(classes)
    assert [list(r.ROIDisplayColor) for r in rt.ROIContourSequence] == [[255, 0, 0], [0, 170, 0], [0, 90, 255]]
    referenced = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == volume.dicom.series_uid
    assert [ref.ReferencedSOPInstanceUID for ref in referenced.ContourImageSequence] == uids
    contour_images = {item.ContourImageSequence[0].ReferencedSOPInstanceUID
                      for roi in rt.ROIContourSequence for item in roi.ContourSequence}
    assert contour_images <= set(uids) and len(contour_images) > 1
    back = read_rtstruct(out / f"{folder.name}_rtstruct.dcm", volume)
    for c in classes:
        assert np.array_equal(back[c], masks[c]), (c, int((back[c] ^ masks[c]).sum()))


def test_contours_fill_back_to_the_mask_even_with_holes_islands_and_thin_parts():
    """The contour writer's even-odd rule: outlines, holes and islands in holes come back pixel for pixel."""
    m = np.zeros((40, 50), np.uint8)
    m[5:35, 5:45] = 1
    m[10:30, 10:40] = 0  # a hole
    m[15:25, 20:30] = 1  # an island in it
    m[18:22, 23:27] = 0  # a hole in the island
    m[2, 0:50] = 1  # a one-pixel line touching the border
    m[37:39, 3] = 1  # a two-pixel stub
    m[0, 49] = 1  # a single pixel in the corner
    polys = mask_contours(m)
    assert np.array_equal(fill_contours(polys, m.shape), m.astype(bool))
    # salt-and-pepper noise: regions touching only at a corner (pinch points), where an outline meets itself. There the
    # fill may differ from the mask, by edge pixels only (ones with a neighbour of the other value): the bound of
    # "a pixel at the edge" (4.9 % of the pixels at worst over 80 noise images; 0 on the model masks of the test above)
    import cv2

    for seed in range(4):
        blobs = (np.random.default_rng(seed).random((60, 60)) > 0.5).astype(np.uint8)
        diff = fill_contours(mask_contours(blobs), blobs.shape) ^ blobs.astype(bool)
        edge = cv2.dilate(blobs, np.ones((3, 3), np.uint8)) != cv2.erode(blobs, np.ones((3, 3), np.uint8))
        assert not (diff & ~edge).any() and diff.sum() <= 0.05 * blobs.size, int(diff.sum())


def test_a_nifti_prediction_keeps_the_affine_and_shape_of_its_scan(tracked_run, tmp_path):
    from giseg.commands.predict import main as predict

    scan = np.random.default_rng(0).integers(0, 3000, (40, 36, 6)).astype(np.int16)
    affine = np.array([[0.0, -1.2, 0.0, 30.0], [1.2, 0.0, 0.0, -20.0], [0.0, 0.0, 4.0, 7.5], [0, 0, 0, 1]])
    src = tmp_path / "in" / "pat_007_0000.nii.gz"
    src.parent.mkdir()
    nib.save(nib.Nifti1Image(scan, affine), src)
    out = tmp_path / "out"
    assert predict(["--model", str(tracked_run / "best"), "--input", str(src.parent), "--out", str(out),
                    "--cache_dir", str(tmp_path / "cache")]) == 0
    pred = nib.load(out / "pat_007.nii.gz")  # named as nnU-Net names a prediction: no channel suffix
    assert pred.shape == scan.shape and np.allclose(pred.affine, affine) and pred.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 3}
    assert read_nifti(src).axis == 2  # the 4 mm axis is the through-plane one


def test_output_names_are_visible_unique_and_never_replace_another_inputs(tracked_run, series, tmp_path):
    """The rule: <out>/<name>.nii.gz (and <name>_rtstruct.dcm), name = a DICOM series' folder name or a NIfTI
    file's name without its ending and nnU-Net's first-channel suffix _0000. Issue #38: scan_2023 and scan_2024
    both became scan; `_0000.nii.gz` and `.` gave hidden, nameless outputs; a second patient's series folder of the
    same name replaced the first patient's NIfTI and RT-Struct without a word."""
    import shutil

    from giseg.commands.predict import main as predict
    from giseg.data.medical import volume_name

    assert [volume_name([tmp_path / n]) for n in ("scan_2023.nii.gz", "la_003_0000.nii.gz", "x.nii")] == \
        ["scan_2023", "la_003", "x"]
    with pytest.raises(UserError, match="gives the outputs no visible name"):
        volume_name([tmp_path / "_0000.nii.gz"])
    folder, _, _ = series
    first, second = tmp_path / "patient1" / "CT", tmp_path / "patient2" / "CT"
    shutil.copytree(folder, first)
    shutil.copytree(folder, second)
    out, common = tmp_path / "out", ["--model", str(tracked_run / "best"), "--cache_dir", str(tmp_path / "cache")]
    assert predict([*common, "--input", str(first), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert predict([*common, "--input", str(second), "--out", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the first patient's outputs, untouched
    assert predict([*common, "--input", str(first), "--out", str(out)]) == 0  # a rerun of the same input


def test_volume_inputs_that_cannot_be_read_get_one_line(tmp_path, series):
    folder, _, _ = series
    with pytest.raises(UserError, match="neither NIfTI files"):
        (tmp_path / "empty").mkdir()
        find_inputs(tmp_path / "empty")
    with pytest.raises(UserError, match="not a NIfTI file"):
        (tmp_path / "scan.png").write_bytes(b"x")
        find_inputs(tmp_path / "scan.png")
    two = tmp_path / "two"
    write_series(two, [np.zeros((8, 8), np.uint16)] * 3, seed=1)
    for f in list(folder.iterdir())[:2]:
        (two / f.name).write_bytes(f.read_bytes())
    with pytest.raises(UserError, match="2 series"):
        read_dicom_series(two)
    gap = tmp_path / "gap"
    write_series(gap, [np.zeros((8, 8), np.uint16)] * 4, seed=2)
    by_depth = sorted(gap.iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    by_depth[1].unlink()
    with pytest.raises(UserError, match="slice spacing varies"):
        read_dicom_series(gap)


def rewrite(path, **attributes):
    ds = pydicom.dcmread(path)
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


def test_a_series_that_is_not_one_greyscale_grid_is_refused_naming_the_file(tmp_path):
    """One slice of another pixel spacing would get the first slice's geometry; an RGB or an enhanced multi-frame
    image is not one plane of a greyscale volume: each is one line naming the file, not a traceback."""
    for k, (attributes, message) in enumerate([
            ({"PixelSpacing": [1.2, 1.2]}, "pixel spacing .* a volume has one pixel spacing"),
            ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "3 samples per pixel"),
            ({"NumberOfFrames": 4}, "enhanced \\(multi-frame\\) image of 4 frames")]):
        folder = tmp_path / f"s{k}"
        write_series(folder, [np.full((8, 8), 100, np.uint16)] * 3, seed=k)
        odd = sorted(folder.iterdir())[1]
        rewrite(odd, **attributes)
        with pytest.raises(UserError, match=message) as caught:
            read_dicom_series(folder)
        assert str(odd) in str(caught.value)


def test_predict_takes_data_dir_or_input(saved_model, tmp_path, capsys):
    from giseg.commands.predict import main as predict

    for argv, message in ((["--model", str(saved_model)], "one of the arguments --data_dir --input is required"),
                          (["--model", str(saved_model), "--data_dir", str(tmp_path), "--input", str(tmp_path)],
                           "argument --input: not allowed with argument --data_dir")):
        with pytest.raises(SystemExit):  # (argparse's own refusal: exit 2)
            predict(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(UserError, match="--fold applies to --data_dir"):
        predict.__wrapped__(["--model", str(saved_model), "--input", str(tmp_path), "--fold", "0"])


def test_a_nifti_is_sliced_along_the_axis_its_sform_says_not_its_stale_pixdim(tmp_path):
    """A file whose sform and pixdim disagree: viewers (and nibabel's img.affine) follow the sform, so the slices
    are cut across the axis whose sform column is longest (it was the pixdim's, a wrong slicing of the volume)."""
    import nibabel as nib

    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    img = nib.Nifti1Image(np.zeros((8, 6, 4), np.int16), affine)
    img.header.set_sform(affine, code=1)
    img.header.set_qform(affine, code=0)
    img.header["pixdim"][1:4] = (3.0, 1.5, 1.5)  # stale: says the first axis is the 3 mm one
    path = tmp_path / "scan.nii.gz"
    nib.save(img, str(path))
    assert tuple(nib.load(str(path)).header.get_zooms()) == (3.0, 1.5, 1.5)  # (the file really disagrees)
    volume = read_nifti(path)
    assert volume.spacing == (1.5, 1.5, 3.0) and volume.axis == 2


def test_a_second_predict_into_an_out_folder_being_written_is_refused(tracked_run, series, tmp_path):
    """Two `giseg predict --input ... --out P` at once both reported success over each other's files (issue #38):
    the writer holds the folder's lock while it writes, and the second is one line, its files untouched."""
    from giseg.commands.predict import main as predict
    from giseg.utils.claims import OUTPUT_LOCK
    from giseg.utils.locks import FolderLock

    folder, _, _ = series
    out = tmp_path / "out"
    common = ["--model", str(tracked_run / "best"), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0"]
    assert predict([*common, "--input", str(folder), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != OUTPUT_LOCK}
    with FolderLock(out / OUTPUT_LOCK):  # another predict, writing there now
        with pytest.raises(UserError, match="is being written by another giseg command"):
            predict.__wrapped__([*common, "--input", str(folder), "--out", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != OUTPUT_LOCK} == before
    assert predict([*common, "--input", str(folder), "--out", str(out)]) == 0  # once it ended, a rerun is fine
