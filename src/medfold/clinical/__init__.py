"""Evaluation a clinical reviewer asks for, from prediction files alone (no model is loaded).

On the held-out test set of an experiment (its fold ensemble, or, where folds have test sets of
their own, each image's prediction averaged over the fold models that predicted it):

* subgroups: per metadata column (categorical as it is, numeric in configured bands) AUROC per
  class and macro, sensitivity and specificity at the thresholds chosen on validation, counts of
  images and patients, each with a patient-bootstrap 95 % interval; groups below a minimum size
  are marked too small instead of given numbers;
* calibration: reliability bins, expected calibration error (ECE) and Brier score per class,
  before and after temperature scaling fitted on each fold's validation predictions;
* operating points: thresholds reaching a target specificity (or sensitivity) on the pooled
  out-of-fold predictions, and what they give on the test set, beside the best the test set's own
  ROC curve allows;
* patient-level results: one score per patient (max or mean of their images) beside per-image;
* paired comparison of two experiments on the same test images: DeLong's test for the AUROC
  difference and the patient-bootstrap interval of the difference.

Where scikit-learn or SciPy have the metric, it is theirs, or checked against theirs in the
tests (the vectorised weighted AUROC below against ``roc_auc_score`` with ``sample_weight``,
the reliability bins against ``calibration_curve``). DeLong's test and ECE exist in neither
and are written here from their definitions (DeLong, DeLong & Clarke-Pearson 1988,
Biometrics 44:837; the midrank form of Sun & Xu 2014, IEEE SPL 21:1389; ECE: Naeini et al.
2015, AAAI; temperature scaling: Guo et al. 2017, ICML).

A bootstrap resample of patients is represented as per-image weights (an image of a patient
drawn k times counts k times: the same as concatenating the draws), so every metric, subgroup
and experiment on the same images is evaluated on the same draws, vectorised over draws.
"""

from ._constants import PROB  # noqa: F401
from .comparison import (  # noqa: F401
    COMPARISON_COLUMNS,
    compare_pair,
    paired_comparisons,
    pairs_to_compare,
)
from .experiment import (  # noqa: F401
    _records,
    calibration_table,
    evaluate_experiment,
    summary_record,
)
from .figures import (  # noqa: F401
    forest_figure,
    reliability_figure,
    write,
)
from .operating import (  # noqa: F401
    _best_at,
    _f,
    calibration,
    operating_points,
    patient_level,
    per_patient,
    threshold_for,
)
from .stats import (  # noqa: F401
    PatientBootstrap,
    _clustered_covariance,
    _logits,
    _midrank_components,
    _nll,
    apply_temperature,
    decisions,
    delong,
    delong_variance,
    fit_temperature,
    interval,
    onehot,
    reliability,
    scored_classes,
    test_predictions,
    weighted_auroc,
    weighted_rates,
)
from .subgroups import (  # noqa: F401
    SUBGROUP_COLUMNS,
    _edge,
    _metric_rows,
    _quiet,
    group_order,
    metadata_column,
    subgroup_of,
    subgroup_results,
)
