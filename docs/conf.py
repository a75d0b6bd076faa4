"""Sphinx configuration for flask_oauth_verify (built with -W)."""

from __future__ import annotations

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
# The [docs] extra installs SQLAlchemy and Flask-SQLAlchemy (autodoc imports
# the tenant-scoping modules, which check the real SQLAlchemy's version);
# only prometheus_client, imported by the metrics module, is mocked.
autodoc_mock_imports = ["prometheus_client"]
nitpicky = False
intersphinx_mapping: dict[str, tuple[str, None]] = {}
html_theme = "alabaster"
exclude_patterns = ["_build"]
suppress_warnings = ["ref.python"]
