"""The command line and the workflows that run every job in turn (the demo pipeline, the
quality benchmark). The top layer: imports everything else."""
