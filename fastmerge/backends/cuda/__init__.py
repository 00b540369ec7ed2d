"""Backend "cuda": the CUDA kernels of csrc/cuda, built as fastmerge._cuda (only when asked
for: FASTMERGE_BUILD_CUDA=1), registered for the CUDA dispatch key of the fastmerge:: ops."""
