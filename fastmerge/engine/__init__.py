"""The checkpoint engine: whole-model merges from a mergekit-style config, streamed under a
memory budget into sharded safetensors (``fastmerge merge`` on the command line). The names
load on first use: the config, checkpoint and writer modules work without torch."""
from .. import _lazy

_LAZY = {"Checkpoint": "checkpoint_io", "CheckpointError": "checkpoint_io",
         "SafetensorsFile": "checkpoint_io", "ConfigError": "config", "MergeConfig": "config",
         "load_config": "config", "parse_config": "config", "MergeResult": "engine",
         "merge_checkpoints": "engine", "OutputError": "writer", "parse_size": "writer"}

__all__ = ["merge_checkpoints", "MergeResult", "load_config", "parse_config", "MergeConfig",
           "ConfigError", "CheckpointError", "OutputError", "Checkpoint", "SafetensorsFile",
           "parse_size"]


__getattr__, __dir__ = _lazy.attributes(__name__, _LAZY, globals())
