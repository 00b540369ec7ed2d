"""Backend "torch": the plain-torch kernels (kernels.py), on any device."""
