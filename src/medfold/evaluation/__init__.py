"""Evaluation from prediction files alone, no model loaded: the metrics (which training also scores its
epochs with), the fold ensemble and experiment aggregates, the clinical reviewer's figures, the label audit."""
