"""medfold: patient-level cross-validated deep learning on medical images."""

__version__ = "0.2.0"
