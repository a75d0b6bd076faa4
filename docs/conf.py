"""Sphinx configuration for flask_oauth_verify (built with -W)."""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "flask_oauth_verify"
author = "flask_oauth_verify developers"
copyright = "2026, flask_oauth_verify developers"
release = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# The docs build with only the [docs] extra installed: the SQLAlchemy extra
# is mocked when it is missing (its type hints then render less precisely).
autodoc_mock_imports = ["prometheus_client"] + [
    name for name in ("sqlalchemy", "flask_sqlalchemy") if importlib.util.find_spec(name) is None
]
nitpicky = False
intersphinx_mapping: dict[str, tuple[str, None]] = {}
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["ref.python"]
