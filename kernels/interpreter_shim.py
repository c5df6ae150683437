"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) run the code that runs on a GPU.

Two gaps of triton 3.6's interpreter are patched, and only when the interpreter is on:

* ``triton.autotune`` with several configs asks the (absent) GPU driver to benchmark them. Here every
  config ties, so the first one is kept: tests exercise the kernel, not the tuning.
* A ``for i in range(n)`` loop variable is a Python int in the interpreter but a tensor when compiled,
  so ``i.to(...)`` fails. The loop variable is rebound as an interpreter tensor.

Import this module before any module that defines kernels (``tests/conftest.py`` does).
"""
import ast
import os

ACTIVE = os.environ.get("TRITON_INTERPRET") == "1"

if ACTIVE:
    from triton.runtime import autotuner as _autotuner
    from triton.runtime import interpreter as _interpreter

    _original_init = _autotuner.Autotuner.__init__

    def _no_benchmark(fn, quantiles=None, **kwargs):
        return [0.0, 0.0, 0.0] if quantiles else 0.0

    def _patched_init(self, *args, **kwargs):
        _original_init(self, *args, **kwargs)
        if getattr(self, "_do_bench", None) is None:
            self._do_bench = _no_benchmark

    _autotuner.Autotuner.__init__ = _patched_init

    class _LoopVarToTensor(_interpreter.ASTTransformer):
        def visit_For(self, node):
            node = self.generic_visit(node)
            it = node.iter
            is_range = isinstance(it, ast.Call) and (
                (isinstance(it.func, ast.Name) and it.func.id == "range")
                or (isinstance(it.func, ast.Attribute) and it.func.attr == "range")
            )
            if is_range and isinstance(node.target, ast.Name):
                name = node.target.id
                rebind = ast.Assign(
                    targets=[ast.Name(id=name, ctx=ast.Store())],
                    value=ast.Call(
                        func=ast.Attribute(value=ast.Name(id="interpreter_semantic", ctx=ast.Load()),
                                           attr="to_tensor", ctx=ast.Load()),
                        args=[ast.Name(id=name, ctx=ast.Load()), ast.Constant(value=False)],
                        keywords=[],
                    ),
                )
                node.body.insert(0, rebind)
            return node

    _interpreter.FunctionRewriter.ast_transformer = _LoopVarToTensor()
