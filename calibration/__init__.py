"""Per-layer sparsity calibration (``sagesla.calibration``): records each layer's topk in a profile."""
