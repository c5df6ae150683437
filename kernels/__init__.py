"""Triton kernels for the ParaRNN cells.

Importing this package needs triton. On a machine without a GPU the kernels run only through
Triton's interpreter, which must be switched on (``TRITON_INTERPRET=1``) before any kernel module
is imported; :mod:`kernels.interpreter_shim` patches the two interpreter gaps we hit.
"""
