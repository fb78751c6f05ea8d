"""profilerec: dynamic user profiles from behaviour logs with a pretrained text encoder, on Ray."""

__version__ = "0.1.0"
