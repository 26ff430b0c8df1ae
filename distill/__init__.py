"""distill: long-context extension by restoration distillation (LongReD), in wings.

base (config, cli, files, hub, schedules) → data → model → optim → parallel → eval / plan → train; merge and
testing beside them. Each wing imports only the wings before it (docs/development.md has the map).
"""
