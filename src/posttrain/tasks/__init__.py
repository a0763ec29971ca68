"""Built-in tasks (``task:NAME``): deterministic row generators with disjoint splits.

Importing the package registers every task module with ``tasks.registry``.
"""

from posttrain.tasks import builtin, preference, rl, safety  # noqa: F401  (they register)
from posttrain.tasks.registry import build_task_rows, list_tasks

__all__ = ["build_task_rows", "list_tasks"]
