"""YAML + ``--set`` overrides -> a validated :class:`~qadpipe.config.schema.PipelineConfig`.

Validation walks the dataclass type hints, so the schema is the single source of truth:
every problem is reported as ONE line that names the dotted field, the bad value and
what is expected (with a "did you mean" for typos).  Range and file checks come from
``field(metadata=...)`` on the schema; cross-field rules from each section's
``validate()`` hook.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from qadpipe.config.schema import PipelineConfig
from qadpipe.errors import ConfigError

# PyYAML follows YAML 1.1, which reads ``2e-5`` (no dot) as a string. Accept such
# strings for float fields, but nothing else that is not a number.
_FLOAT_LITERAL = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, less three YAML 1.1 surprises a config must not meet silently:
    numbers in other bases (``seed: 010`` is 8, ``1:30`` is 90, ``lr: 1:30.5`` is 90.5; here
    they stay strings, which a number field refuses by name; decimal, 0x hex and ``.inf``
    remain), dates (``data.chat_date: 2026-12-07`` stays the text a string field takes, and
    ``2026-13-01`` is refused by the field, not by PyYAML) and a key given twice in one
    mapping (PyYAML keeps the last: a second ``distill:`` block drops the first one's fields)."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                       if tag not in (_INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG)]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:   # `<<: *defaults`: merged by PyYAML, the keys written here win
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain name, got {type(key).__name__} {key!r}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice in one mapping (YAML would keep only the last)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ConfigLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
                                    list("-+0123456789"))
_ConfigLoader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                                                        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                                                        |[-+]?\.(?:inf|Inf|INF)
                                                        |\.(?:nan|NaN|NAN))$""", re.X),
                                    list("-+0123456789."))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 -- a SafeLoader subclass


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML file (or start from defaults), apply ``a.b=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> PipelineConfig:
    """Validate a plain nested dict against the schema."""
    config = _build_dataclass(PipelineConfig, raw, "")
    _run_validate_hooks(config, "")
    return config


#: Fields added after students were already recorded, with what the qadpipe that recorded
#: one without the field did -- which is not always the field's default for new runs.
_BEFORE_FIELD = {("quant", "moe_experts"): "dense"}


def recorded_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A run record's ``config`` as the qadpipe that wrote it applied it: a field it predates
    gets the behaviour it had (its MoE experts stayed dense), not today's default."""
    upgraded = copy.deepcopy(raw)
    for (section, name), value in _BEFORE_FIELD.items():
        fields = upgraded.get(section)
        if isinstance(fields, dict) and name not in fields:
            fields[name] = value
    quant = upgraded.get("quant")
    if isinstance(quant, dict) and "lsq_grid" not in quant and quant.get("learnable") == "lsq":
        quant["lsq_grid"] = "full"   # learnable: lsq moved an int preset to the full grid before the field
    return upgraded


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain data (for printing and saving next to outputs)."""
    return dataclasses.asdict(config)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict (``config_to_dict``, a run record's ``config``) as dotted keys:
    ``{"distill.lr": 1e-05, ...}``, the names ``--set`` and error messages use."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(flatten_config(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _parse_yaml(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML{where} ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file, expected YAML") from None
    except RecursionError:   # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping of sections, got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{item}': expected KEY=VALUE, e.g. distill.lr=2e-5")
    try:
        value = _parse_yaml(text) if text.strip() else ""
        dropped = _yaml_comment(text)
    except yaml.YAMLError:
        value, dropped = text, ""
    if dropped:
        raise ConfigError(f"--set '{item}': YAML reads '{dropped}' as a comment and drops it; "
                          f"quote the value to keep it: {key.strip()}='{text.strip()}'")
    parts = _key_parts(key.strip())
    if _is_text_field(parts) and value is not None and not isinstance(value, str):
        value = text.strip()   # a name YAML reads as another type: model.path=yes, export.output_dir=2024
    node = raw
    for depth, part in enumerate(parts[:-1]):
        if node.get(part) is None:   # absent, or a section whose fields are all commented out
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"--set '{item}': '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def _schema_field(parts: list[str]) -> tuple[Any, int]:
    """The type hint ``parts`` lead to in the schema and how many parts name it (a mapping
    field's key is the rest of them, dots and all); (None, 0) off the schema."""
    cls: Any = PipelineConfig
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None, 0
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None, 0
        if typing.get_origin(hint) is dict:
            return hint, depth + 1
        cls = hint
    return cls, len(parts)


def _key_parts(key: str) -> list[str]:
    """``eval.models.qwen3-1.7b-int4`` -> ['eval', 'models', 'qwen3-1.7b-int4']: a mapping's key
    is one name even when it holds dots."""
    parts = key.split(".")
    hint, depth = _schema_field(parts)
    if typing.get_origin(hint) is dict and depth < len(parts):
        return parts[:depth] + [".".join(parts[depth:])]
    return parts


def _is_text_field(parts: list[str]) -> bool:
    """Whether ``parts`` name a string field (or a value of a string mapping)."""
    hint, depth = _schema_field(parts)
    if typing.get_origin(hint) is dict:
        return depth < len(parts) and typing.get_args(hint)[1:] == (str,)
    return hint is str or hint == Optional[str]


def _yaml_comment(text: str) -> str:
    """What YAML would silently drop from a --set value as a comment (``k=x #1`` reads as x)."""
    tokens = [t for t in yaml.scan(text) if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    end = max((t.end_mark.index for t in tokens), default=0)
    return text[end:].strip()


def _build_dataclass(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: got {_show(raw)}, expected a mapping of fields")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in raw:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix, str(key), list(fields)))
    values: dict[str, Any] = {}
    for name, field in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in raw:
            value = _coerce(hints[name], raw[name], dotted)
            if field.metadata.get("path"):
                value = _expand_home(value)
            _check_metadata(field.metadata, value, dotted)
            values[name] = value
        elif field.metadata.get("required"):   # a default no one means (a rule's empty regex matches all)
            raise ConfigError(f"{dotted}: missing, expected {field.metadata['help']}")
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build_dataclass(hints[name], {}, dotted)
    return cls(**values)


def _expand_home(value: Any) -> Any:
    """``~/x`` -> ``/home/me/x`` in a path field (each value of a mapping of paths), as a
    shell does; an object-store URI and other values stay as they are."""
    if isinstance(value, dict):
        return {key: _expand_home(item) for key, item in value.items()}
    if isinstance(value, str) and value.startswith("~") and "://" not in value:
        return os.path.expanduser(value)
    return value


def _coerce(hint: Any, value: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, dotted)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(option, value, dotted)
            except ConfigError as exc:
                errors.append(exc)
        if len(options) == 1:
            if value is False:   # YAML 1.1 reads an unquoted off/no/false as a bool: the way to say none is null
                raise ConfigError(f"{errors[0]}; for none, null (YAML reads off and no as false)")
            raise errors[0]
        raise ConfigError(f"{dotted}: got {_show(value)}, expected {_describe(hint)}")
    if origin is Literal:
        if isinstance(value, bool) and "on" in args and "off" in args:
            return "on" if value else "off"   # YAML 1.1 reads an unquoted on/off (yes/no) as a bool
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_text = f"; did you mean '{close[0]}'?" if close else ""
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(f"{dotted}: got {_show(value)}, expected one of {choices}{hint_text}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted}: got {_show(value)}, expected a list")
        item = args[0] if args else Any
        return [_coerce(item, v, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: got {_show(value)}, expected a mapping")
        item = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(item, v, f"{dotted}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: got {_show(value)}, expected true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{dotted}: got {_show(value)}, expected an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result = float(value)
        elif isinstance(value, str) and _FLOAT_LITERAL.match(value.strip()):
            result = float(value)
        else:
            raise ConfigError(f"{dotted}: got {_show(value)}, expected a number")
        if not math.isfinite(result):
            raise ConfigError(f"{dotted}: got {_show(value)}, expected a finite number")
        return result
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{dotted}: got {_show(value)}, expected a string")
    raise TypeError(f"config schema field {dotted} has an unsupported type {hint!r}")


def _check_metadata(meta: typing.Mapping[str, Any], value: Any, dotted: str) -> None:
    if value is None:
        return
    for key, op, words in (
        ("gt", lambda v, b: v > b, "> {}"),
        ("ge", lambda v, b: v >= b, ">= {}"),
        ("lt", lambda v, b: v < b, "< {}"),
        ("le", lambda v, b: v <= b, "<= {}"),
    ):
        if key in meta and not op(value, meta[key]):
            raise ConfigError(f"{dotted}: got {_show(value)}, expected a value {words.format(meta[key])}")
    if meta.get("nonempty") and not value:
        raise ConfigError(f"{dotted}: must not be empty")
    check = meta.get("check")
    if check is not None:
        problem = check(value)
        if problem:
            raise ConfigError(f"{dotted}: got {_show(value)}, {problem}")


def _run_validate_hooks(node: Any, prefix: str) -> None:
    """Children first, then the section's own cross-field ``validate()``."""
    for field in dataclasses.fields(node):
        child = getattr(node, field.name)
        if dataclasses.is_dataclass(child):
            _run_validate_hooks(child, f"{prefix}.{field.name}" if prefix else field.name)
    hook = getattr(node, "validate", None)
    if hook is not None:
        problem = hook()
        if problem:
            raise ConfigError(f"{prefix + '.' if prefix else ''}{problem}")


def _unknown_key_message(prefix: str, key: str, known: list[str]) -> str:
    dotted = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        suggestion = f"{prefix}.{close[0]}" if prefix else close[0]
        return f"{dotted}: unknown key; did you mean '{suggestion}'?"
    return f"{dotted}: unknown key; expected one of {', '.join(known)}"


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"
