"""dnsproxy: a pollution-resistant DNS forwarder (see README.md)."""

__version__ = "0.1.0"
