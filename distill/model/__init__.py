"""The model wing: loading students and teachers, RoPE, attention kernels, decoder forwards, FLOPs, export,
importing other checkpoints, layer selection, hybrid expansion, the objectives (losses on model outputs)."""
