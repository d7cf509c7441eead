"""Hugging Face ``datasets`` both ways: read any image-segmentation dataset (``--dataset hf``), write ours as one.

In:  a ``save_to_disk`` folder, a folder ``datasets.load_dataset`` reads (parquet, ...) or a hub id (where the Hub
     is reachable), split ``--hf_split``. Columns:
       image            ``--image_column`` (default: ``image``, else ``pixel_values``), any PIL mode; RGB is
                        read as luminance (the pipeline is single-channel, as MRI is), 16-bit stays 16-bit;
       ground truth     either a label map ``--label_column`` (default: ``label``, else ``annotation``): one class
                        index per pixel, names from ``id2label.json`` beside the data (as on the Hub); or one mask
                        image per class, columns ``mask_<class>`` (multi-label: classes may overlap), names from
                        the columns (ordered by ``id2label.json`` when there is one);
       optional         ``id`` (unique), ``--case_column`` (default ``case``: the unit of the case-level folds;
                        without one each image is its own case), ``day`` (a case's volumes), ``slice`` (order in
                        a volume), ``spacing_x``/``spacing_y`` (mm).
     Label maps follow the HF example's conventions: ``--reduce_labels`` turns 0 into 255 and every other value
     v into v - 1; then 255 is unlabelled (left out of loss and metrics), a label named ``background`` and a 0
     that id2label does not name are background, and any other value missing from id2label is an error.
Out: ``export_dataset`` (``giseg export-hf``) writes a dataset adapter's data as a ``datasets.Dataset``
     folder in exactly the multi-label form above, with the scans as stored (16-bit).

``datasets`` is imported only in this package, and only when one of its functions runs. One module per job:
options (HFOptions), layout (which columns hold what), reading (split, arrays, index, Reader), adapter
(HFAdapter), export (export_dataset).
"""
