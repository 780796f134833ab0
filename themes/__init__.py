"""Dashboard themes: TOML files beside this module (and in the user's theme directory), loaded into
Textual ``Theme`` objects.

A theme file has a ``name``, optional ``dark`` and ``ansi`` flags, a ``[colors]`` table with the
Theme's colour fields (``primary`` is required) and an optional ``[variables]`` table of Textual
CSS variables. Errors name the file and the field.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from textual.theme import Theme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

THEME_DIR = Path(__file__).resolve().parent
DEFAULT_THEME = "flockctl-dark"
COLORS = (
    "primary",
    "secondary",
    "warning",
    "error",
    "success",
    "accent",
    "foreground",
    "background",
    "surface",
    "panel",
    "boost",
)


class ThemeError(ValueError):
    """A theme file that cannot become a Theme; the message names the file and the problem."""


def load_theme(path: Path) -> Theme:
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ThemeError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ThemeError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"name", "dark", "ansi", "colors", "variables"}
    if unknown:
        raise ThemeError(f"{path}: unknown field(s): {', '.join(sorted(unknown))}")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ThemeError(f"{path}: 'name' must be a non-empty string")
    colors = data.get("colors", {})
    if not isinstance(colors, dict) or not isinstance(colors.get("primary"), str):
        raise ThemeError(f"{path}: [colors] must set at least 'primary'")
    bad = [k for k, v in colors.items() if k not in COLORS or not isinstance(v, str)]
    if bad:
        raise ThemeError(
            f"{path}: [colors] {', '.join(sorted(bad))}: expected one of {', '.join(COLORS)}"
            " with a colour string"
        )
    variables = data.get("variables", {})
    if not isinstance(variables, dict) or not all(isinstance(v, str) for v in variables.values()):
        raise ThemeError(f"{path}: [variables] must map names to strings")
    for flag in ("dark", "ansi"):
        if not isinstance(data.get(flag, False), bool):
            raise ThemeError(f"{path}: '{flag}' must be true or false")
    try:
        return Theme(
            name=name,
            dark=data.get("dark", True),
            ansi=data.get("ansi", False),
            variables=dict(variables),
            **colors,
        )
    except Exception as exc:  # Textual parses the colours: name the file
        raise ThemeError(f"{path}: {exc}") from None


def theme_files(extra: Path | None = None) -> list[Path]:
    """The bundled theme files, then the user's (``extra``) in name order; a later file with the
    same theme name wins."""
    files = sorted(THEME_DIR.glob("*.toml"))
    if extra is not None and extra.is_dir():
        files += sorted(extra.glob("*.toml"))
    return files


def load_themes(extra: Path | None = None) -> dict[str, Theme]:
    themes: dict[str, Theme] = {}
    for path in theme_files(extra):
        theme = load_theme(path)
        themes[theme.name] = theme
    return themes
