"""Index a dataset into one validated table: image, patient, labels, size, content hash.

Three adapters read what users have (a folder-per-class tree, a CSV such as NIH's
``Data_Entry_2017.csv``, a MedMNIST ``.npz``) into the same candidate table; the rest
(patient IDs, label checks, decoding every image, duplicates) is shared. A bad image never
aborts indexing: it is listed in the report with its reason and left out of the table.
"""

from ._constants import INDEX_SCHEMA, META_KEY, NPZ_SPLITS  # noqa: F401
from .adapters import (  # noqa: F401
    ADAPTERS,
    _check_npz,
    _csv_candidates,
    _folder_candidates,
    _inside_root,
    _locate,
    _merge_repeated_rows,
    _npz_candidates,
    _npz_names,
    _split_from_lists,
    apply_filter,
    map_labels,
)
from .build import (  # noqa: F401
    PROCESS_MIN_IMAGES,
    _check_metadata_columns,
    _dicom_header_columns,
    _exclude_listed,
    _finish,
    _one_blas_thread,
    _report,
    build_index,
    check_images,
    read_id_list,
)
from .duplicates import (  # noqa: F401
    _near_duplicates,
    _pair_record,
    _text,
)
from .io import (  # noqa: F401
    _arrow,
    _frame,
    read_index,
    with_defaults,
    write_index,
)
from .labels import (  # noqa: F401
    _check_labels,
)
from .patients import (  # noqa: F401
    NO_PATIENTS,
    _dicom_patients,
    _patient_regex,
    _resolve_patients,
    patient_from_name,
)
from .stage import (  # noqa: F401
    IndexOutputs,
    index_job,
)
