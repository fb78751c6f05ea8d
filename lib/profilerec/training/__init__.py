"""Training on Ray Train: the shared harness, the profile scorer, the encoder fine-tune.
Imports data, model, runtime."""
