"""meterhub: edge gateway for smart electricity meters."""

__version__ = "0.1.0"
