"""Drop-in integrations of fastmerge into other merging tools.

- :mod:`fastmerge.integrations.mergekit`: make mergekit's own pipeline (``mergekit-yaml``,
  ``run_merge``, its Python API) compute the per-tensor math of task_arithmetic, ties,
  dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties and linear with fastmerge.
- :mod:`fastmerge.integrations.peft`: functions with the signatures of
  ``peft.utils.merge_utils`` computed by fastmerge with peft's semantics, and a patch that makes
  ``LoraModel.add_weighted_adapter`` use them.

Neither module imports its peer at import time of this package; each checks the installed
version when its ``install()`` runs. See docs/integrations.md.
"""
from __future__ import annotations

__all__ = ["mergekit", "peft"]
