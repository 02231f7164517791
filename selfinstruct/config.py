"""Typed configuration that maps 1:1 onto CLI flags and TOML tables.

Every subcommand has one pydantic model (a `Section`). Its fields become `--field-name` flags and keys of the
TOML table named after the command (`[generate]`, `[train]`, …). A field whose type is itself a `Section`
(e.g. `teacher: TeacherConfig`) is read from its own top-level table (`[teacher]`) and its flags are flattened
without a prefix (`--model`, `--base-url`), so one `run.toml` can configure every command.

A field declared with `subtable(...)` is a table *inside* the command's table instead (`[generate.bootstrap]`),
and its flags carry a prefix (`--bootstrap-temperature`): settings that belong to one command only.

Precedence: model defaults < TOML file < flags. Any unknown key or bad value is a `UserError` naming the key
(and the flag or file it came from). Saved configs never hold secrets: keys that look secret are redacted and
passwords in URLs are masked.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selfinstruct.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


SHARED_TABLES = ("teacher", "filters")
"""TOML tables of sections that several commands nest (e.g. `generate` and `evaluate` both use `[teacher]`)."""


class Section(BaseModel):
    """Base of every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- field introspection


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _is_section(annotation: Any) -> bool:
    a = _unwrap_optional(annotation)
    return isinstance(a, type) and issubclass(a, Section)


def _extra(field: Any) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _is_subtable(field: Any) -> bool:
    return bool(_extra(field).get("subtable"))


def iter_flags(model: type[Section], prefix: tuple[str, ...] = (), flag_prefix: str = ""):
    """Yield (path, flag, field) for every leaf field, flattening nested sections without a prefix (a subtable's
    flags get its own prefix).

    A field declared with `json_schema_extra={"flag": None}` is TOML-only and yields no flag. Subtables come
    last (they are the detail settings, and `--help` lists flags in this order).
    """
    fields = sorted(model.model_fields.items(), key=lambda item: _is_subtable(item[1]))
    for name, field in fields:
        if _is_section(field.annotation):
            sub_prefix = _extra(field).get("flag_prefix", "")
            yield from iter_flags(
                _unwrap_optional(field.annotation), (*prefix, name), flag_prefix + sub_prefix
            )
        else:
            flag = _extra(field).get("flag", "--" + flag_prefix + name.replace("_", "-"))
            if flag is not None:
                yield (*prefix, name), flag, field


# ---------------------------------------------------------------- argparse


def add_arguments(parser: argparse.ArgumentParser, model: type[Section]) -> None:
    """Add one flag (or positional) per field. Values stay strings; pydantic converts and validates them."""
    seen: dict[str, tuple[str, ...]] = {}
    for path, flag, field in iter_flags(model):
        if flag in seen:
            raise RuntimeError(f"flag {flag} is used by both {seen[flag]} and {path}")  # a bug in our models
        seen[flag] = path
        dest = ".".join(path)
        annotation = _unwrap_optional(field.annotation)
        help_text = field.description or ""
        if get_origin(annotation) is Literal:
            help_text += " {" + ",".join(map(str, get_args(annotation))) + "}"
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        if default not in (None, "", [], {}):
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")
        if _extra(field).get("positional"):
            parser.add_argument(
                dest,
                nargs="*" if get_origin(annotation) is list else "?",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=path[-1].upper(),
            )
        elif annotation is bool:
            parser.add_argument(
                flag,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        elif get_origin(annotation) is list:
            parser.add_argument(
                flag,
                dest=dest,
                action="append",
                default=argparse.SUPPRESS,
                metavar="A,B",
                help=help_text + " (comma-separated or repeated)",
            )
        else:
            parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar="VALUE", help=help_text)


def _flag_values(model: type[Section], namespace: dict[str, Any]) -> tuple[dict[str, Any], dict[tuple, str]]:
    """Turn parsed flags into a nested dict; also return which flag each path came from."""
    values: dict[str, Any] = {}
    origin: dict[tuple, str] = {}
    for path, flag, field in iter_flags(model):
        dest = ".".join(path)
        if dest not in namespace:
            continue
        raw = namespace[dest]
        annotation = _unwrap_optional(field.annotation)
        if get_origin(annotation) is list:
            raw = [item.strip() for chunk in raw for item in chunk.split(",") if item.strip()]
        elif get_origin(annotation) is dict or annotation is dict:
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{flag}: not valid JSON ({e.msg})") from None
        elif isinstance(raw, str) and raw.lower() in ("none", "null") and field.default is None:
            raw = None
        node = values
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = raw
        origin[path] = flag if not _extra(field).get("positional") else path[-1].upper()
    return values, origin


# ---------------------------------------------------------------- TOML


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read config file ({e})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{p}: invalid TOML: {e}") from None


def _toml_values(command: str, model: type[Section], data: dict[str, Any]) -> dict[str, Any]:
    """Pick the command's table and the tables of its nested sections out of a parsed TOML document."""
    nested = {
        name for name, f in model.model_fields.items() if _is_section(f.annotation) and not _is_subtable(f)
    }
    values = dict(data.get(command, {}))
    for name in nested:
        if name in data:
            merged = dict(data[name])
            merged.update(values.get(name, {}))  # [generate.teacher] wins over [teacher]
            values[name] = merged
    return values


def check_tables(data: dict[str, Any], known: set[str], source: str) -> None:
    for key, value in data.items():
        if key not in known:
            raise UserError(
                f"{source}: unknown table or key '{key}' (known tables: {', '.join(sorted(known))})"
            )
        if not isinstance(value, dict):
            raise UserError(f"{source}: '{key}' must be a table ([{key}])")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---------------------------------------------------------------- resolve


def resolve(
    command: str,
    model: type[Section],
    namespace: dict[str, Any],
    toml_data: dict[str, Any] | None = None,
    toml_source: str = "config",
) -> Section:
    """Defaults < TOML < flags, validated; errors name the key and where it came from."""
    from_toml = _toml_values(command, model, toml_data or {})
    from_flags, flag_origin = _flag_values(model, namespace)
    merged = _deep_merge(from_toml, from_flags)
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(str(x) for x in err["loc"])
        key = ".".join(loc)
        if err["type"] == "extra_forbidden":
            table = command if len(loc) == 1 else loc[0]
            if len(loc) > 1 and loc[0] in model.model_fields and _is_subtable(model.model_fields[loc[0]]):
                table = f"{command}.{loc[0]}"
            raise UserError(f"{toml_source}: unknown key '{loc[-1]}' in [{table}]") from None
        where = flag_origin.get(tuple(err["loc"][: len(loc)]))
        if where is None:
            top_nested = loc[0] if len(loc) > 1 and loc[0] in model.model_fields else None
            if top_nested and _is_subtable(model.model_fields[top_nested]):
                top_nested = f"{command}.{top_nested}"
            where = (
                f"{toml_source} [{top_nested or command}]"
                if (toml_data and _has(from_toml, loc))
                else "default"
            )
        got = err.get("input")
        got_text = "" if isinstance(got, dict) or err["type"] == "missing" else f" (got {got!r})"
        raise UserError(f"invalid setting {key} from {where}: {err['msg']}{got_text}") from None


def _has(d: dict[str, Any], loc: tuple[str, ...]) -> bool:
    node: Any = d
    for k in loc:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return True


# ---------------------------------------------------------------- save (secrets redacted)

_SECRET_KEY = re.compile(r"(api_?key|token|secret|password)$", re.I)
_URL_PASSWORD = re.compile(r"(://[^/:@\s]+):[^/@\s]+@")


def redact(value: Any, key: str = "") -> Any:
    """Mask anything that looks like a secret; env-var *names* (keys ending in `_env`) are kept."""
    if isinstance(value, dict):
        return {k: redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEY.search(key) and value:
            return "***"
        return _URL_PASSWORD.sub(r"\1:***@", value)
    return value


def config_to_toml(command: str, cfg: Section) -> str:
    """Serialize in the same layout `--config` reads back (command table + one table per nested section)."""
    import tomli_w

    data = redact(cfg.model_dump(mode="json", exclude_none=True))
    fields = type(cfg).model_fields
    for k in [k for k in data if _is_subtable(fields[k]) and not data[k]]:
        del data[k]  # an all-default subtable: no empty [command.name] table
    nested = {
        k: data.pop(k)
        for k in list(data)
        if _is_section(fields[k].annotation) and not _is_subtable(fields[k])
    }
    return tomli_w.dumps({command: data, **nested})


def save_config(command: str, cfg: Section, path: str | Path) -> None:
    from selfinstruct.store import atomic_write_text

    atomic_write_text(Path(path), config_to_toml(command, cfg))


def subtable(model: type[Section], description: str, flag_prefix: str) -> Any:
    """A nested section read from a table inside the command's table (`[generate.bootstrap]`), its flags
    prefixed (`--bootstrap-temperature`)."""
    return Field(
        default_factory=model,
        description=description,
        json_schema_extra={"subtable": True, "flag_prefix": flag_prefix},
    )


def add_field(model: type[Section], name: str, annotation: Any, field: Any) -> None:
    """Give an already built settings model one more field (a table for a stage registered after the model
    was made). Pydantic collects fields when a class is created, so the field joins the collected ones and the
    model is rebuilt; flags, TOML, validation and the saved config all read the fields from there."""
    from pydantic.fields import FieldInfo

    model.__pydantic_fields__[name] = FieldInfo.from_annotated_attribute(annotation, field)
    model.model_rebuild(force=True)


def optional(description: str, **kw: Any) -> Any:
    """A setting that is unset (None) unless given: the flag's help text says what unset means."""
    return Field(None, description=description, **kw)


# The budget and prompt settings the teacher-driven commands share (`generate`, `evolve`, `magpie`, `converse`,
# `prefs`): declared once, so their flags read and validate alike.
MaxRequests = Annotated[
    int | None, Field(ge=1, description="stop after this many teacher requests (whole run, all sessions)")
]
MaxTokens = Annotated[
    int | None, Field(ge=1, description="stop after this many prompt + completion tokens (whole run)")
]
MaxCost = Annotated[
    float | None, Field(gt=0, description="stop after this much estimated cost in USD (whole run)")
]
PromptDir = Annotated[
    str | None,
    Field(description="directory with prompt templates overriding the built-in ones (by file name)"),
]
