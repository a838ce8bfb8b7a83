"""mkdocs hook: the configuration page's table of settings, generated from
`exporter.settings.Settings` at build time, so that the page cannot drift from the code.

configuration.md holds the marker below; the hook replaces it with one row per field: the
environment variable (and its other names), the type and bounds, the default, and the field's
`description`. A field without a description fails the build.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.livereload import LiveReloadServer
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page
from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from exporter import settings

MARKER = "<!-- settings-table -->"
PAGE = "configuration.md"

_DURATION_UNITS = (("d", 86400), ("h", 3600), ("min", 60))


def on_page_markdown(
    markdown: str, /, *, page: Page, config: MkDocsConfig, files: Files
) -> str | None:
    if page.file.src_uri != PAGE:
        return None
    if MARKER not in markdown:
        raise PluginError(f"{PAGE} lost its marker {MARKER!r}: the settings table has no place")
    return markdown.replace(MARKER, settings_table())


def on_serve(
    server: LiveReloadServer, /, *, config: MkDocsConfig, builder: Any
) -> LiveReloadServer | None:
    # `mkdocs serve` rebuilds when the settings change, not only when docs/ does.
    server.watch(str(Path(settings.__file__)))
    return server


def settings_table() -> str:
    model = settings.Settings
    prefix = str(model.model_config.get("env_prefix", "")).upper()
    rows = [
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        if not field.description:
            raise PluginError(f"Settings.{name} has no description")
        rows.append(
            "| "
            + " | ".join(
                _cell(text)
                for text in (
                    " or ".join(f"`{env}`" for env in env_names(name, field, prefix)),
                    type_text(field),
                    default_text(name, field.default),
                    field.description,
                )
            )
            + " |"
        )
    return "\n".join(rows)


def env_names(name: str, field: FieldInfo, prefix: str) -> list[str]:
    """The variables a field is read from: `PREFIX_NAME`, or, when the field has a
    validation alias, those of its names that carry the prefix (in the order they are tried)."""
    alias = field.validation_alias
    if alias is None:
        return [prefix + name.upper()]
    choices = alias.choices if isinstance(alias, AliasChoices) else [alias]
    names = [c.upper() for c in choices if isinstance(c, str) and c.upper().startswith(prefix)]
    if not names:
        raise PluginError(f"Settings.{name}: no alias with the prefix {prefix!r}")
    return names


def type_text(field: FieldInfo) -> str:
    text = _annotation_text(field.annotation)
    bounds = [_bound_text(item) for item in field.metadata]
    return ", ".join([text, *(b for b in bounds if b)])


def _annotation_text(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_annotation_text(a) for a in args)
    if origin is typing.Annotated:
        return _annotation_text(args[0])
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return "comma-separated list"
    simple = {bool: "boolean", int: "integer", float: "number", str: "text"}
    if annotation in simple:
        return simple[annotation]
    raise PluginError(f"no text for the settings type {annotation!r}")


def _bound_text(item: object) -> str | None:
    if isinstance(item, annotated_types.Ge):
        return f"≥ {item.ge}"
    if isinstance(item, annotated_types.Gt):
        return f"> {item.gt}"
    if isinstance(item, annotated_types.Le):
        return f"≤ {item.le}"
    if isinstance(item, annotated_types.Lt):
        return f"< {item.lt}"
    if isinstance(item, annotated_types.MinLen):
        return f"at least {item.min_length} characters"
    if isinstance(item, annotated_types.MaxLen):
        return f"at most {item.max_length} characters"
    return None


def default_text(name: str, default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        return "`" + ",".join(str(part) for part in default) + "`"
    if isinstance(default, float) and default.is_integer():
        default = int(default)
    text = f"`{default}`"
    if name.endswith("_s") and isinstance(default, int | float):
        for unit, seconds in _DURATION_UNITS:
            if default >= seconds and default % seconds == 0:
                return f"{text} ({default // seconds:g} {unit})"
    return text


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
