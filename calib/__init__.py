"""Accuracy: calibration data, activation ranges, FP16 precision plans and comparison reports."""
