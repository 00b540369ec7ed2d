"""The one pipeline: whole-model merges from a mergekit-style config, streamed under a memory
budget into sharded safetensors (``fastmerge merge`` on the command line). driver.py is the
streaming loop; torch_kernels.py / core_kernels.py adapt a backend to it; native.py picks one.
The names load on first use: the config, checkpoint and writer modules work without torch."""
from .. import _lazy

_CHECKPOINT, _CONFIG, _WRITER = ".checkpoint.safetensors_file", ".recipe.config", ".output.writer"
_LAZY = {"Checkpoint": _CHECKPOINT, "CheckpointError": _CHECKPOINT,
         "SafetensorsFile": _CHECKPOINT, "ConfigError": _CONFIG, "MergeConfig": _CONFIG,
         "load_config": _CONFIG, "parse_config": _CONFIG, "MergeResult": ".output.report",
         "merge_checkpoints": "torch_entry", "OutputError": _WRITER, "parse_size": _WRITER}

__all__ = ["merge_checkpoints", "MergeResult", "load_config", "parse_config", "MergeConfig",
           "ConfigError", "CheckpointError", "OutputError", "Checkpoint", "SafetensorsFile",
           "parse_size"]


__getattr__, __dir__ = _lazy.attributes(__name__, _LAZY, globals())
