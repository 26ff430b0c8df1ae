"""Parallel modes behind one interface (`Strategy`, distill.parallel.base), picked once from the launcher
(`distill.parallel.launcher.choose`).

| launch                                                      | strategy                          |
|-------------------------------------------------------------|-----------------------------------|
| `python -m distill.train`, or any launch of one process     | `Replicated` (one process)        |
| `accelerate launch` (MULTI_GPU, e.g. recipes/accelerate/ddp.yaml) | `Replicated` (data parallel) |
| `accelerate launch --config_file recipes/accelerate/fsdp2.yaml`   | `FSDP2`                      |
| `accelerate launch --config_file recipes/accelerate/zero3.yaml`   | `ZeRO3` (DeepSpeed)          |
"""
