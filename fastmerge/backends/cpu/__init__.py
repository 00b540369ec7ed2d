"""Backend "cpu": the C++ kernels of csrc/cpu, built twice over the same sources:
fastmerge._C registers them for the CPU dispatch key of the fastmerge:: ops (torch tensors),
fastmerge._core binds them over buffers without torch (what ``fastmerge merge`` runs)."""
