"""The live service: profile shards (state, write-ahead log, snapshots), their Ray actors,
the HTTP API and its reads. Imports data and model, never batch or training."""
