"""Plugins for the segmentation toolboxes. ``import fastctx`` never imports them, nor the
toolboxes; each plugin imports its toolbox and says clearly when it cannot.

- :mod:`fastctx.integrations.mmseg`: mmsegmentation heads (``FastCCHead``) in mmseg's
  ``MODELS`` registry, for ``custom_imports=dict(imports=['fastctx.integrations.mmseg'])``.
- :mod:`fastctx.integrations.sssegmentation`: sssegmentation segmentors (``FastCCNet``) in
  ssseg's ``SegmentorBuilder``.

Both build the toolbox's own module, then :func:`fastctx.swap` its context modules (strict):
same config keys, same ``state_dict``, same numbers, fastctx's kernels.
"""

from __future__ import annotations

import importlib
import importlib.util
import types


def require(module: str, plugin: str, toolbox: str) -> types.ModuleType:
    """Import ``module`` of ``toolbox`` for ``plugin``, or raise an ImportError that says whether
    the toolbox is missing or installed but failing to import, and what to do."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        try:
            installed = importlib.util.find_spec(top) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            msg = f"{plugin} needs {toolbox}, which is not installed (`pip install {toolbox}`)"
        else:
            msg = f"{plugin} needs {toolbox}: it is installed but `import {module}` failed: {e}"
        raise ImportError(msg) from e
