"""Makes ``pertpy.tl.ContrastiveVAE`` available once ``pertpy_contrastive`` is imported.

pertpy has no plugin mechanism (it does not read entry points), so the class is added to the
``pertpy.tools`` module and its ``__all__``. pertpy's lazy ``__getattr__`` for its own tools is
left alone: only an attribute and a list entry are added.
"""

from __future__ import annotations

import warnings

TOOL_NAME = "ContrastiveVAE"


def register_with_pertpy(tool: type) -> bool:
    """Add ``tool`` to ``pertpy.tools`` as ``ContrastiveVAE``; idempotent.

    Returns ``False``, with a warning, if ``pertpy.tools`` already has a different object under
    that name, which is then left in place.
    """
    import pertpy.tools as tools

    existing = vars(tools).get(TOOL_NAME)
    if existing is not None and existing is not tool:
        warnings.warn(
            f"pertpy.tools.{TOOL_NAME} is already {existing!r}; pertpy_contrastive did not "
            f"replace it. Use pertpy_contrastive.{TOOL_NAME} directly.",
            UserWarning,
            stacklevel=2,
        )
        return False
    tools.ContrastiveVAE = tool
    if TOOL_NAME not in tools.__all__:
        tools.__all__.append(TOOL_NAME)
    return True
