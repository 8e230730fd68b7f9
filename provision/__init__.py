"""provision: reproducible, content-addressed build environments."""

__version__ = "0.1.0"
