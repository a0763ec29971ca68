"""Isolated execution of untrusted (model-written) Python code. See docs/sandbox.md.

>>> from posttrain.sandbox import run_program
>>> run_program("print(1 + 1)").stdout
'2\\n'
"""

from posttrain.sandbox.check import check_isolation
from posttrain.sandbox.config import Isolation, SandboxConfig, SandboxResult, Status
from posttrain.sandbox.pool import run_many
from posttrain.sandbox.runner import SandboxUnavailableError, run_program

__all__ = ["Isolation", "SandboxConfig", "SandboxResult", "SandboxUnavailableError", "Status",
           "check_isolation", "run_many", "run_program"]
