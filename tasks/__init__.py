"""Node implementations, one module per family. Importing this package
registers every node type (modules are discovered, so adding a family is
adding a module)."""

import importlib
import pkgutil

from tasks.base import NODE_TYPES, Node, NodeError, NodeParams, RunContext, Stream  # noqa: F401

_NOT_NODES = {"base", "schema", "storage", "stats"}

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _NOT_NODES and not _mod.name.startswith("_"):
        importlib.import_module(f"tasks.{_mod.name}")
