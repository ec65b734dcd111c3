"""Typed pipeline config: the schema (``schema.py``) and its YAML loader (``loader.py``)."""

from qadpipe.config.loader import (
    build_config, config_to_dict, dump_yaml, flatten_config, load_config, recorded_config,
)
from qadpipe.config.schema import PipelineConfig

__all__ = ["PipelineConfig", "build_config", "config_to_dict", "dump_yaml", "flatten_config", "load_config",
           "recorded_config"]
