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
