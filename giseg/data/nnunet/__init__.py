r"""nnU-Net raw datasets (``--dataset nnunet``): NIfTI volumes sliced for the 2D / 2.5D models; and the writer of one.

    <data_dir>/dataset.json                   labels, channel_names, file_ending (nnU-Net v2; v1's "modality" too)
    <data_dir>/imagesTr/<case>_0000.nii.gz    the scan, one file per channel
    <data_dir>/labelsTr/<case>.nii.gz         its integer label map: the scan's shape and affine
    <data_dir>/imagesTs/<case>_0000.nii.gz    optional, unlabelled: what giseg predict reads when it is there

The format of the Medical Segmentation Decathlon, AMOS, KiTS and TotalSegmentator's exports. Read with nibabel,
imported when an nnU-Net folder is read (pip install -e ".[medical]").

- **Classes** are the non-background entries of ``labels``, in their order. A plain entry (``"liver": 1``) is the
  voxels of that value; a region (``"tumor core": [2, 3]``, nnU-Net's region-based training) the voxels of any of
  its values, so regions overlap and the classes are multi-label. ``--task multiclass`` resolves overlaps as nnU-Net
  writes a label map from regions: the later region wins.
  A label value in a file that no entry names is an error, as is a label map of fractional values.
- **Slices** are cut across the through-plane axis: the one with the largest voxel spacing (nnU-Net's 2D
  configuration; the last axis when they tie); ``"slice_axis": 0|1|2`` in dataset.json overrides it. A slice is the
  voxel array with its two in-plane axes as (H, W) = (second, first), as viewers show an axial slice; numbered from
  1 along the axis. Its ``id`` is ``<case>_slice_<SSSS>``; the spacing (x, y, through-plane) is in the index.
- **Cases**: each file is a volume and, by default, its own case of the case-level folds. Scans of one patient on
  several days would then be split across folds; ``"case_pattern"`` in dataset.json, a regular expression over the
  file's case name with a group ``case`` (the patient) and optionally ``day``, groups them
  (``"^case(?P<case>\d+)_day(?P<day>\d+)$"`` is what ``export_nnunet`` writes for the GI data).
- **Channels**: one channel (``channel_names`` with one entry) is the single-channel path of every dataset: the
  slice repeated to the model's channels, or ``--context_slices`` neighbours (2.5D). Several (``<case>_0000``,
  ``<case>_0001``, ... on one grid: T1 and T2, multi-parametric MRI) are the model's input channels, each slice's
  channels in turn (times ``--context_slices`` neighbours), through the input widening of the 2.5D context
  (models/widen.py); each channel is normalised on its own.
- **Intensities** are normalised per slice (0.5th to 99.5th percentile), as for the GI scans.

    giseg demo-data --dataset nnunet --out demo/nnunet     # the GI demo written in this format

One module per job: dataset_json (read and checked), index (cases, channels, geometry checks), adapter
(NnUNetAdapter), export (export_nnunet); NIfTI volumes are read by giseg/data/nifti.py."""
