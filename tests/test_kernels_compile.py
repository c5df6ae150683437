"""Every Triton kernel of ``kernels/`` compiles for an H200 (sm_90) on a machine without a GPU.

The rest of the CPU suite runs the kernels through Triton's interpreter, which executes their Python and
checks no types, so a kernel can be right there and fail to compile for a GPU: on 2026-12-01 a helper of
the conv kernel returned int64 positions on one branch and int32 steps on the other; every interpreter test
passed and the H200 refused it ("Inconsistent return types"). Here a child process without
``TRITON_INTERPRET`` gives Triton a driver that only names the target (CUDA, capability 90, warp 32) and
turns every launch into ``JITFunction.run(..., warmup=True)``: Triton's own binding and specialisation of
the real arguments, then its compiler's front end (TTIR, ~10 s for everything), where a kernel's types,
shapes and constexprs are checked, what the interpreter skips. ``python tests/test_kernels_compile.py --full``
goes on to TTGIR, LLVM IR, PTX and a cubin from the wheel's ptxas (~6 minutes on two cores: too slow for the
suite; layouts and registers are the GPU run's to find). The public functions are called as the LM calls
them: the conv + SiLU with and without document positions, and the ParaRNN solver's forward and backward for
both cells and both methods, with bias, clip, resets, an initial state and a head-split P, in fp32 and bf16.
Nothing is computed (the outputs are uninitialised memory): values are the interpreter tests' and
``benchmarks/check_gpu.py``'s job.

Mutations seen failing: ``_positions`` in ``kernels/conv/conv_silu.py`` without its ``.to(tl.int32)`` (the
H200's error); the GRU sweep backward's ``lam_c`` started as an int32 ``tl.zeros`` (a loop-carried variable
that becomes fp32 in the chunk loop); the sweep method left out of the calls (the coverage check names the
two sweep backward kernels no call reached).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = ("cuda", 90, 32)


def _entry_kernels() -> set[str]:
    """The launchable kernels: the ``*_kernel`` JIT functions of the kernel modules."""
    from triton.runtime.jit import JITFunction

    import kernels.conv.conv_silu as conv
    import kernels.pararnn.newton as newton
    import kernels.pararnn.sweep as sweep
    return {name for module in (conv, newton, sweep) for name, obj in vars(module).items()
            if name.endswith("_kernel") and isinstance(obj, JITFunction)}


def _calls() -> None:
    """Every kernel, launched as the LM launches it."""
    import torch

    from kernels.conv import causal_conv_silu
    from kernels.pararnn import solve_backward, solve_forward

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        # conv + SiLU: v a strided half of a wider tensor, as the block passes it
        v = torch.randn(2, 70, 2 * 24, generator=g).to(dtype)[..., :24].requires_grad_()
        w = torch.randn(24, 4, generator=g, requires_grad=True)
        b = torch.randn(24, generator=g, requires_grad=True)
        for pos in (torch.arange(70).repeat(2, 1) % 33, None):
            causal_conv_silu(v, w, b, pos).sum().backward()
        # the ParaRNN solver: head-split P [B, T, 3, H, N/H], bias, clip, resets, h0
        B, T, H, NH = 2, 40, 2, 16
        for cell, K in (("gru", 1), ("lstm", 2)):
            P = torch.randn(B, T, 3, H, NH, generator=g).to(dtype)
            A = torch.rand(3, H * NH, generator=g) - 0.5
            C = torch.rand(2, H * NH, generator=g) - 0.5 if cell == "lstm" else None
            h0 = torch.randn(B, K, H * NH, generator=g)
            reset = torch.zeros(B, T, dtype=torch.bool)
            reset[:, 17] = True
            bias = torch.randn(3, H * NH, generator=g)
            for method in ("newton", "sweep"):
                h, _ = solve_forward(cell, P, A, C, h0, reset, method=method, bias=bias, clip=0.5, residual=True,
                                     fallback_tol=1e-3, fallback_count=torch.zeros((), dtype=torch.int64))
                solve_backward(cell, P, A, C, h0, reset, h, torch.randn(B, T, K, H * NH, generator=g),
                               bias=bias, clip=0.5, method=method)


class _FrontEndDone(Exception):
    """Raised in place of the stage after TTIR when only the front end is compiled."""


def child(full: bool) -> None:
    """Compile instead of launching, make the calls, print the compiled kernels as JSON. Without ``full``,
    the compiler's front end only (TTIR; the whole pipeline spends its ~6 minutes in TTGIR -> LLVM and ptxas)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, jit

    class TargetOnly:
        """Names the target; anything that would need a GPU fails loudly."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget(*TARGET)

        def __getattr__(self, name):
            raise AttributeError(f"no GPU here: the driver's {name} is not available")

    driver.set_active(TargetOnly())
    compiled: dict[str, int] = {}
    run = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
            assert "cubin" in kernel.asm, f"{self.__name__}: no cubin"
        except _FrontEndDone:
            kernel = None  # nothing cached: the next launch of the same variant runs the front end again
        compiled[self.__name__] = compiled.get(self.__name__, 0) + 1
        return kernel

    def front_end_only(backend, stages, options, language, capability):
        def stop(src, metadata):
            raise _FrontEndDone

        stages["ttgir"] = stop

    jit.JITFunction.run = compile_only
    if not full:
        knobs.runtime.add_stages_inspection_hook = front_end_only
    import kernels.pararnn.api as api

    api._hooks_active = lambda: True  # every launch through Triton: the launch cache would run a cached kernel
    _calls()
    print(json.dumps({"compiled": compiled, "entry": sorted(_entry_kernels())}))


def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = set(result["entry"]) - set(result["compiled"])
    assert not missing, f"kernels never launched by the calls: {sorted(missing)}"
    assert len(result["entry"]) >= 11, result  # conv 3, ParaRNN 8: a module not found would shrink the set


if __name__ == "__main__":
    # python tests/test_kernels_compile.py [--full]   (--full: down to a cubin, ~6 min on two cores)
    sys.path.insert(0, ROOT)
    child(full="--full" in sys.argv[1:])
