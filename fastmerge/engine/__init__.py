"""The checkpoint engine: whole-model merges from a mergekit-style config, streamed under a
memory budget into sharded safetensors (``fastmerge merge`` on the command line)."""
from .checkpoint_io import Checkpoint, CheckpointError, SafetensorsFile
from .config import ConfigError, MergeConfig, load_config, parse_config
from .engine import MergeResult, merge_checkpoints
from .writer import OutputError, parse_size

__all__ = ["merge_checkpoints", "MergeResult", "load_config", "parse_config", "MergeConfig",
           "ConfigError", "CheckpointError", "OutputError", "Checkpoint", "SafetensorsFile",
           "parse_size"]
