"""The checkpoint engine: whole-model merges from a mergekit-style config, streamed under a
memory budget into sharded safetensors (``fastmerge merge`` on the command line). The names
load on first use: the config, checkpoint and writer modules work without torch."""
import importlib

_LAZY = {"Checkpoint": "checkpoint_io", "CheckpointError": "checkpoint_io",
         "SafetensorsFile": "checkpoint_io", "ConfigError": "config", "MergeConfig": "config",
         "load_config": "config", "parse_config": "config", "MergeResult": "engine",
         "merge_checkpoints": "engine", "OutputError": "writer", "parse_size": "writer"}

__all__ = ["merge_checkpoints", "MergeResult", "load_config", "parse_config", "MergeConfig",
           "ConfigError", "CheckpointError", "OutputError", "Checkpoint", "SafetensorsFile",
           "parse_size"]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
