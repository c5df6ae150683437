"""Interpreter-only speed-up: ``tl.associative_scan`` with a custom combine, vectorised.

Triton 3.6's CPU interpreter (``TRITON_INTERPRET=1``) runs a custom-combine scan as a Python loop
over *every element* of the block (``ScanOps.generic_scan``, ~90 µs/element). The combine function
is elementwise, so calling it once per position along the scan axis on whole slices gives the same
values in the same (sequential) order, ``BLOCK_N`` times faster for our ``[BLOCK_T, BLOCK_N]`` tiles.

Applied on import of :mod:`kernels.pararnn` when the interpreter is on; a no-op otherwise.
"""
import os

import numpy as np

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED or os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter as _interpreter

    ScanOps = getattr(_interpreter, "ScanOps", None)
    if ScanOps is None or not hasattr(ScanOps, "generic_scan"):
        return

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

    ScanOps.generic_scan = generic_scan
    _APPLIED = True
