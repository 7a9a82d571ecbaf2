__version__ = "0.1.0"
"""fxghost's release version (pyproject.toml reads it from here)."""
