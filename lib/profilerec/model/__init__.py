"""The profile and its scoring, without Ray: the profile state and its update, the text encoder,
the item index, item priors, the profile scorer, replaying a log into cases, ranking and its
metrics. Imports data."""
