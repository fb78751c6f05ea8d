"""Batch jobs on Ray Data and local workers: encoding texts, building every profile,
evaluation. Imports data, model, runtime."""
