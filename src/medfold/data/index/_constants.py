"""Constants the parts of medfold.data.index share."""

from __future__ import annotations

import pyarrow as pa

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("patient_id", pa.string()),
        ("labels", pa.list_(pa.string())),
        ("source_split", pa.string()),
        ("npz_index", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("mode", pa.string()),
        ("file_bytes", pa.int64()),
        ("content_hash", pa.string()),
        ("present", pa.bool_()),
        ("fingerprint", pa.string()),
        ("near_duplicate_cluster", pa.int64()),
        ("patient_aliases", pa.list_(pa.string())),
        ("study_uid", pa.string()),
        ("series_uid", pa.string()),
        # what outputs meant to be shared show (medfold.core.privacy): pseudonyms, or the IDs as they are
        ("shared_image_id", pa.string()),
        ("shared_patient_id", pa.string()),
        ("shared_patient_aliases", pa.list_(pa.string())),
    ]
)
META_KEY = b"medfold"
NPZ_SPLITS = ("train", "val", "test")
