"""The package version, importable without importing the package root (checkpoint headers use it)."""

__version__ = "0.2.0"
