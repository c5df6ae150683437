"""Triton kernels (``kernels.pararnn``: the ParaGRU / ParaLSTM solves).

On a machine without a GPU the kernels run only through Triton's interpreter, which must be switched on
(``TRITON_INTERPRET=1``) before this package is imported; :mod:`kernels.interpreter_shim`, imported here,
then patches the interpreter gaps we hit.
"""
from . import interpreter_shim  # noqa: F401  (before any kernel module is defined)
