"""Reading inputs, without torch: safetensors files and model directories
(safetensors_file.py), hub ids resolved to local folders (hub.py) or, before any download,
to their config, index and headers (hub_headers.py), OS helpers (libc.py)."""
