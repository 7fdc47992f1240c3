"""One self-contained HTML page from the result files alone: no training, no model loading.

Two steps: :func:`gather` reads the result files into typed views (dataclasses of tables,
figures and values, below), and the Jinja2 templates in ``templates/`` lay them out. Jinja2 runs
with autoescaping on, so every string from a dataset (file names, class names, patient IDs,
config values) is escaped by default; only the figures this module draws (matplotlib SVG, PNG data
URLs) are marked safe. Figures are inline, styles are inline, and the page asks no other host for
anything, so it reads the same offline or mailed as one file.

The page opens with the comparison of experiments; each experiment's detail (a grid's
combinations included), the dataset's near-duplicates, the explanations and the job timings are
collapsible ``<details>`` blocks, and wide tables scroll inside the page.
"""

import matplotlib

matplotlib.use("Agg")  # before any part imports pyplot

from ._constants import CHEXNET_AUROC, PALETTE, TEMPLATES  # noqa: E402, F401
from .dataset import (  # noqa: E402, F401
    _pair_text,
    dataset_view,
    examples,
    near_duplicates_view,
    split_view,
)
from .experiments import (  # noqa: E402, F401
    HEADLINE,
    FoldReport,
    _figure,
    _p,
    clinical_view,
    comparisons_table,
    compression_view,
    cv_tests_table,
    ensemble_view,
    experiment_view,
    experiments_table,
    explanations_view,
    fold_reports,
    grid_view,
    provenance_view,
    pruned_line,
    recipe_table,
    reference_view,
    report_tables,
    run_value,
    stages_table,
    variance_table,
)
from .figures import (  # noqa: E402, F401
    CURVES,
    compression_figure,
    curves_figure,
    read_timings,
    roc_figure,
)
from .helpers import (  # noqa: E402, F401
    _ci,
    _count,
    _mean,
    _mean_pm,
    _pixels,
    _pm,
    _with_ci,
    file_data_url,
    fmt,
    png_data_url,
    svg,
)
from .page import (  # noqa: E402, F401
    ReportOutputs,
    card_view,
    environment,
    external_view,
    gather,
    label_audit_view,
    render,
    report_job,
)
from .views import (  # noqa: E402, F401
    CardView,
    Clinical,
    CompressedExperiment,
    CompressionView,
    DatasetView,
    Ensemble,
    ExperimentView,
    ExplainedFold,
    ExplanationsView,
    ExternalView,
    GridView,
    LabelAuditView,
    NearDuplicateCluster,
    NearDuplicates,
    Picture,
    Provenance,
    ReferenceView,
    Report,
    SplitView,
    Table,
)
