"""The package's version, where every module (the report writers included) can read it without importing
the package's front door."""

__version__ = "0.1.0"
