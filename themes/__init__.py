"""Dashboard themes, kept as data files beside this module."""

from __future__ import annotations
