"""The library's version: one place, imported by the package and by the manifest writer."""

__version__ = "0.1.0"
