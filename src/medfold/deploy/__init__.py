"""Deployment: the fold ensemble predicting on new images (predict), exported as one ONNX file with its
model card (export, card), and validated on another site's data (external)."""
