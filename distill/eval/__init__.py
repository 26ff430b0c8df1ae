"""The evaluation wing: short-text retention, NLL by position, passkey retrieval, RULER-style tasks, the
suite that runs them on a model or a checkpoint, and the weight-interpolation sweep."""
