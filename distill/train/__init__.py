"""The training wing: the loop (`distill.train.loop`, run by `python -m distill.train`), one optimiser step,
checkpoints and resume, metrics, step spans."""
