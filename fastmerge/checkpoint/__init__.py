"""Reading inputs, without torch: safetensors files and model directories
(safetensors_file.py), hub ids resolved to local folders (hub.py), OS helpers (libc.py)."""
