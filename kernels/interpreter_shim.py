"""Make Triton's CPU interpreter (``TRITON_INTERPRET=1``) run the code that runs on a GPU, fast enough for tests.

The one place the interpreter is patched, and only when it is on (importing this module is a no-op
otherwise). ``kernels/__init__.py`` imports it, so any ``import kernels...`` applies it; the environment
variable must be set before that import and before any other module defines Triton kernels.

* ``triton.autotune`` with several configs asks the (absent) GPU driver to benchmark them. Here every
  config ties, so the first one is kept: tests exercise the kernel, not the tuning.
* A ``for i in range(n)`` loop variable is a Python int in the interpreter but a tensor when compiled,
  so ``i.to(...)`` fails. The loop variable is rebound as an interpreter tensor.
* ``tl.associative_scan`` with a custom combine runs as a Python loop over *every element* of the block
  (``ScanOps.generic_scan``, ~90 µs per element). The combine function is elementwise, so calling it once
  per position along the scan axis on whole slices gives the same values in the same (sequential)
  order, ``BLOCK_N`` times faster for the ParaRNN kernels' ``[BLOCK_T, BLOCK_N]`` tiles.
"""
import ast
import os

import numpy as np

ACTIVE = os.environ.get("TRITON_INTERPRET") == "1"


def _patch_autotune() -> None:
    from triton.runtime import autotuner

    original_init = autotuner.Autotuner.__init__

    def no_benchmark(fn, quantiles=None, **kwargs):
        return [0.0, 0.0, 0.0] if quantiles else 0.0

    def patched_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if getattr(self, "_do_bench", None) is None:
            self._do_bench = no_benchmark

    autotuner.Autotuner.__init__ = patched_init


def _patch_loop_variables() -> None:
    from triton.runtime import interpreter

    class LoopVarToTensor(interpreter.ASTTransformer):
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

    interpreter.FunctionRewriter.ast_transformer = LoopVarToTensor()


def _patch_custom_scan() -> None:
    from triton.runtime import interpreter

    def generic_scan(self, input):
        datas = [arg.handle.data for arg in input]
        dtypes = [arg.dtype for arg in input]
        axis = self.axis
        outs = [np.empty_like(d) for d in datas]
        n = datas[0].shape[axis]
        acc = [np.take(d, 0, axis=axis) for d in datas]
        for j, o in enumerate(outs):
            idx = [slice(None)] * o.ndim
            idx[axis] = 0
            o[tuple(idx)] = acc[j]
        for i in range(1, n):
            cur = tuple(self.to_tensor(np.take(d, i, axis=axis), dt) for d, dt in zip(datas, dtypes))
            prev = tuple(self.to_tensor(a, dt) for a, dt in zip(acc, dtypes))
            ret = self.combine_fn.fn(*prev, *cur)
            ret = ret if isinstance(ret, tuple) else (ret,)
            acc = [r.handle.data if hasattr(r, "handle") else np.asarray(r) for r in ret]
            for j, o in enumerate(outs):
                idx = [slice(None)] * o.ndim
                idx[axis] = i
                o[tuple(idx)] = acc[j]
        return [self.to_tensor(o, dt) for o, dt in zip(outs, dtypes)]

    interpreter.ScanOps.generic_scan = generic_scan


if ACTIVE:
    _patch_autotune()
    _patch_loop_variables()
    _patch_custom_scan()
