"""What a merge config means, resolved before any weight is read: config.py reads the
mergekit-style YAML into a MergeConfig with per-tensor parameters."""
