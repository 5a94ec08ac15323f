"""The package version, kept in this one place (read by the build through a regex)."""

__version__ = "0.1.0"
