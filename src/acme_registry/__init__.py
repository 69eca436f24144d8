"""acme-registry: a container image registry that obtains and renews its own certificate."""

__version__ = "0.1.0"
