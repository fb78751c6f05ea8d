"""Training on Ray Train: the shared harness, the losses, the profile scorer and its second stage,
the encoder fine-tune.
Imports data, model, runtime."""
