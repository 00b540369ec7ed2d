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

import contextlib
import os
from typing import Callable, Optional, Sequence

__all__ = ["mergekit", "peft"]


def check_supported(package: str, version: Optional[str], supported: tuple, force_env: str,
                    error: type, install_hint: str, strict: bool = True,
                    extra: str = "") -> str:
    """The installed ``version`` of ``package``, or ``error`` with a message saying what to do:
    not installed, or (when ``strict``) not one of ``supported`` unless ``force_env=1``."""
    if version is None:
        raise error(f"{package} is not installed; `{install_hint}` to use "
                    f"fastmerge.integrations.{package}")
    if strict and version not in supported and os.environ.get(force_env, "") != "1":
        raise error(f"fastmerge.integrations.{package} supports {package} "
                    f"{', '.join(supported)}; {package} {version} is installed. "
                    f"{extra}Install a supported version, or set {force_env}=1 to try anyway.")
    return version


@contextlib.contextmanager
def installed_within(state, fields: Sequence[str], install: Callable[[], None],
                     uninstall: Callable[[], None]):
    """The body of a ``patched()`` context manager: ``install()`` for the block; after it,
    ``uninstall()`` unless the patch was installed before (``state.installed``), in which
    case ``state``'s ``fields`` get their values of before back."""
    was = state.installed
    prev = [getattr(state, f) for f in fields]
    install()
    try:
        yield
    finally:
        if not was:
            uninstall()
        else:
            for f, v in zip(fields, prev):
                setattr(state, f, v)
