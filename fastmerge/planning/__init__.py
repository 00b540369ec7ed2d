"""Exact selection and planning, shared by every backend: thresholds.py and planner.py
(torch-free) turn a MergeSpec and the histograms a backend computes into per-model kernel
rows; selection.py and plan.py drive a backend's primitives over torch chunks."""
