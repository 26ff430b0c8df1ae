"""The optimiser wing: AdamW parameter groups and kernels, gradient clipping, and gradient localisation
(traced layers) that sets per-layer learning rates."""
