"""Training configuration: frozen dataclasses, TOML recipes, dotted overrides, validation."""

from __future__ import annotations

from resnext.config.io import (
    config_from_dict,
    config_to_dict,
    list_recipes,
    load_config,
    make_config,
    recipe_path,
    save_config,
    to_toml,
)
from resnext.config.schema import (
    Config,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from resnext.config.validate import validate

__all__ = [
    "Config",
    "DataConfig",
    "FinetuneConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "list_recipes",
    "load_config",
    "make_config",
    "recipe_path",
    "save_config",
    "to_toml",
    "validate",
]
