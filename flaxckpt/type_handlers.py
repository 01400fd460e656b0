"""Per-leaf argument classes under the name Orbax's docs use (``ocp.type_handlers.SaveArgs``)."""

from flaxckpt._types import ArrayRestoreArgs, RestoreArgs, SaveArgs

__all__ = ['ArrayRestoreArgs', 'RestoreArgs', 'SaveArgs']
