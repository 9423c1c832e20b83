"""Config files: find a recipe by name or path, read TOML, apply overrides, and save the resolved config."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

from resnext.config.build import build_section, set_dotted, to_dict
from resnext.config.schema import Config
from resnext.config.validate import validate
from resnext.errors import ConfigError
from resnext.io.atomic import write_text


def list_recipes() -> list[str]:
    """Names of the recipes shipped in resnext/configs."""
    folder = resources.files("resnext.configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def recipe_path(name_or_path: str | Path) -> Path:
    """The file of a recipe given by path, or by the name of a shipped recipe."""
    path = Path(name_or_path)
    if path.suffix in (".toml", ".json") and path.is_file():
        return path
    if path.parent != Path("."):
        # A path with a folder names that file: a shipped recipe of the same file name would be
        # another config than the one asked for.
        raise ConfigError(
            f"config {str(name_or_path)!r}: no such file (shipped recipes are named without a "
            f"folder: {', '.join(list_recipes())})"
        )
    shipped = resources.files("resnext.configs") / f"{path.name.removesuffix('.toml')}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(
        f"config {str(name_or_path)!r}: no such file and no shipped recipe of that name "
        f"(recipes: {', '.join(list_recipes())})"
    )


def read_file(path: Path) -> dict[str, Any]:
    """The nested dict of a TOML or JSON config file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a table at the top level")
    return data


def parse_overrides(items: Sequence[str]) -> list[tuple[str, str]]:
    """`key=value` strings split into pairs; anything else is a ConfigError."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        pairs.append((key.strip(), value))
    return pairs


# Short aliases accepted on the command line for the most common overrides.
_ALIASES = {"epochs": "train.epochs", "seed": "train.seed", "resume": "train.resume"}


def make_config(
    data: Mapping[str, Any] | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> Config:
    """A validated Config from a nested dict plus dotted overrides (strings `k=v` or a mapping)."""
    tree: dict[str, Any] = json.loads(json.dumps(dict(data or {})))
    pairs = overrides.items() if isinstance(overrides, Mapping) else parse_overrides(overrides)
    for key, value in pairs:
        set_dotted(tree, _ALIASES.get(key, key), value)
    return validate(build_section(Config, tree))


def load_config(
    name_or_path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> Config:
    """Load a recipe (shipped name or file path), merge `key=value` overrides, validate, freeze."""
    path = recipe_path(name_or_path)
    data = read_file(path)
    data.setdefault("name", path.stem)
    if is_saved_run_config(path) and _unedited_output_dir(path, data):
        # A run's own saved config names that run's folder wherever it is now and whatever the
        # current directory: `--config RUN/config.toml` continues RUN (an override still wins).
        data["output_dir"] = str(path.parent.resolve())
    return make_config(data, overrides)


def _unedited_output_dir(path: Path, data: Mapping[str, Any]) -> bool:
    # A run writes config.toml and config.json together: where this file's output_dir is still
    # its twin's, nobody has edited it to point the run elsewhere.
    twin = path.with_suffix(".json" if path.suffix == ".toml" else ".toml")
    try:
        other = read_file(twin)
    except ConfigError:
        return False
    return other.get("output_dir") == data.get("output_dir")


def is_saved_run_config(path: Path) -> bool:
    """Whether `path` is the config.toml/config.json a run saved into its folder (beside its
    provenance record), rather than a recipe."""
    return (
        path.name in ("config.toml", "config.json") and (path.parent / "provenance.json").is_file()
    )


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as a plain nested dict."""
    return to_dict(cfg)


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated Config from the dict that `config_to_dict` (or a saved run) gave."""
    return make_config(data)


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes (quote, backslash, control characters below U+0020)
    are TOML's too; other characters stay as they are, since TOML's \\u escapes must name
    Unicode scalar values (not JSON's surrogate pairs), and DEL, which TOML does not allow raw,
    is escaped."""
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ConfigError(f"cannot write {text!r} to TOML: not valid Unicode (a lone surrogate)")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007F")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            raise ConfigError(f"cannot write non-finite float {value} to TOML")
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """A TOML document of a nested dict of scalars, lists and tables (None values are left out)."""
    lines: list[str] = []
    tables = []
    for key, value in data.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in tables:
        name = f"{_prefix}{key}"
        lines.append("")
        lines.append(f"[{name}]")
        body = to_toml(value, f"{name}.")
        lines.extend(body.splitlines())
    return "\n".join(lines).strip("\n") + "\n"


def save_config(cfg: Config, folder: str | Path) -> tuple[Path, Path]:
    """Write the resolved config as config.json and config.toml into `folder`; return both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    json_path = folder / "config.json"
    toml_path = folder / "config.toml"
    toml_text = to_toml(data)  # before writing either: TOML refuses some values JSON takes
    write_text(json_path, json.dumps(data, indent=2) + "\n")
    write_text(toml_path, toml_text)
    return json_path, toml_path
