"""The run configuration: typed sections (``schema``), loading (``loading``), typed data
sources (``sources``) and the ``dino_core`` specs built from it (``specs``)."""

from service.config.loading import (
    apply_overrides,
    environment_defaults,
    flatten,
    load_config,
    resolve_paths,
    to_yaml,
    validate,
)
from service.config.presets import names as preset_names
from service.config.schema import DinoConfig, url_scheme
from service.config.sources import (
    DataSource,
    FolderSource,
    ProceduralSource,
    ShardsSource,
    UrlSource,
    parse_source,
)
from service.config.specs import (
    backbone_meta,
    multicrop_spec,
    network_spec,
    recipe_spec,
    schedule_spec,
)
from service.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataSource",
    "DinoConfig",
    "FolderSource",
    "ProceduralSource",
    "ShardsSource",
    "UrlSource",
    "apply_overrides",
    "backbone_meta",
    "environment_defaults",
    "flatten",
    "load_config",
    "multicrop_spec",
    "network_spec",
    "parse_source",
    "preset_names",
    "recipe_spec",
    "resolve_paths",
    "schedule_spec",
    "to_yaml",
    "url_scheme",
    "validate",
]
