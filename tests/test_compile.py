"""Issue 18: the fused linear + cross-entropy + z-loss, the FLOP count behind the MFU, and ``trainer.compile``.

References are independent of the code under test: ``F.cross_entropy`` and ``torch.logsumexp`` on the full
logits for the loss, ``torch.utils.flop_counter.FlopCounterMode`` over a real forward + backward for the
FLOPs, an eager ``train.py`` run for the compiled one.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models.registry import build_model
from training.flops import flops_per_token, mean_context
from training.loss import IGNORE_INDEX, linear_cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_loss(hidden, weight, labels, z_coef):
    """``F.cross_entropy`` (ignore_index -100) + ``z_coef · mean(logsumexp²)`` over the scored tokens, on the
    full fp32 logits."""
    logits = (hidden @ weight.t()).reshape(-1, weight.shape[0])
    flat = labels.reshape(-1)
    scored = flat != IGNORE_INDEX
    ce = F.cross_entropy(logits, flat, ignore_index=IGNORE_INDEX)
    z = z_coef * torch.logsumexp(logits, -1)[scored].square().mean()
    return ce + z, ce, z


@pytest.mark.parametrize("shape, vocab, chunk", [((3, 7, 5), 11, 4), ((2, 13, 6), 37, 5), ((1, 9, 3), 7, 64)])
def test_fused_loss_equals_cross_entropy_plus_z_loss(shape, vocab, chunk):
    """Odd shapes, chunks that do not divide the tokens (and one larger than them), -100 labels: the value and
    both gradients (hidden states, head weight) equal the full-logits reference to 1e-5 in fp32, and the
    logged ce and z are the reference's. Mutation: the z-loss gradient's ``2 * z_coef`` as ``z_coef`` in
    training/loss.py::_chunk -> fails (grad); ``inv_count`` over all tokens instead of the scored -> fails."""
    torch.manual_seed(0)
    hidden = torch.randn(*shape, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(vocab, shape[-1], dtype=torch.float32, requires_grad=True)
    labels = torch.randint(0, vocab, shape[:-1])
    labels[0, ::3] = IGNORE_INDEX
    labels[-1, -1] = IGNORE_INDEX
    z_coef = 0.1  # large, so a wrong z-loss gradient is not lost in the cross-entropy's
    loss, ce, z = linear_cross_entropy(hidden, weight, labels, z_coef, chunk_tokens=chunk)
    ref, ref_ce, ref_z = reference_loss(hidden, weight, labels, z_coef)
    assert ce.item() == pytest.approx(ref_ce.item(), rel=1e-5)
    assert z.item() == pytest.approx(ref_z.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    upstream = torch.tensor(1.7)  # a scaled loss (grad accumulation): the backward scales the saved gradients
    grads = torch.autograd.grad(loss * upstream, (hidden, weight))
    ref_grads = torch.autograd.grad(ref * upstream, (hidden, weight))
    for name, a, b in zip(("hidden", "weight"), grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), f"d{name}: max err {(a - b).abs().max():.3g}"


def test_fused_loss_with_no_scored_token_is_zero():
    """Every label -100: loss, ce, z and both gradients are 0 (F.cross_entropy would give NaN: the mean of
    nothing). Mutation: count without clamp_min(1) -> NaN -> fails."""
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(5, 4, requires_grad=True)
    loss, ce, z = linear_cross_entropy(hidden, weight, torch.full((2, 3), IGNORE_INDEX), 1e-4, chunk_tokens=4)
    assert loss.item() == ce.item() == z.item() == 0.0
    for g in torch.autograd.grad(loss, (hidden, weight)):
        assert torch.equal(g, torch.zeros_like(g))


def tiny_model(preset: str, **overrides):
    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{preset}.yaml"))
    config = {**OmegaConf.to_container(cfg.config), **overrides}
    torch.manual_seed(0)
    return build_model(cfg.arch, config, 97)


def test_transformer_flops_match_flop_counter():
    """The Transformer's model FLOPs per token (training/flops.py) against torch's FlopCounterMode over one
    forward + backward, attention in HF's eager implementation so that QKᵀ and AV are bmm's the counter
    sees (it charges them over all T keys, so the count is taken at mean_context = T). The difference
    allowed (0.5%) is what the counter does not see: the norms' weights, which 6·params counts as if they
    were multiplied (measured: 0.26%). Mutation: attention ``12·d·c`` as ``6·d·c``
    -> fails; the input embedding left in ``matmul`` -> fails."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model("transformer_tiny", hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=128)
    model.set_attn_implementation("eager")  # the CPU's SDPA kernel is not in the counter's table
    B, T = 2, 128
    ids = torch.randint(0, 97, (B, T))
    pos = torch.arange(T).repeat(B, 1)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, position_ids=pos).logits.float().sum().backward()
    counted = counter.get_total_flops() / (B * T)
    params = sum(p.numel() for p in model.parameters())
    ours = flops_per_token("transformer", model.config, params, mean_context=T)["model"]
    assert ours == pytest.approx(counted, rel=5e-3)
    assert mean_context(pos) == pytest.approx((T + 1) / 2)  # causal: a query at p sees p + 1 keys


def run_train(run_dir, compile_: bool, preset: str) -> list[float]:
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"run_dir={run_dir}", f"model={preset}",
           "model.config.hidden_size=32", "model.config.num_hidden_layers=2", "data.seq_len=32",
           "data.validation_rows=8", "trainer.batch_size=4", "trainer.max_steps=12", "trainer.warmup_steps=2",
           "trainer.log_every=1", "trainer.val_every=100", "trainer.val_batches=1", "trainer.ckpt_every=100",
           f"trainer.compile={str(compile_).lower()}"]
    # no Inductor / AOTAutograd cache: its key does not cover a custom op's Python autograd formula, so a
    # cached graph could stand in for the code under test
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["paragru_tiny", "paralstm_tiny", "transformer_tiny", "mamba2_tiny"])
def test_compiled_training_matches_eager_and_learns(tmp_path, preset):
    """``train.py trainer.compile=true`` (Inductor's CPU backend; the ParaRNN cell through its custom ops) for
    12 steps: every step's loss within 5e-4 (absolute; measured: < 1e-5) of the eager run's (same seed and
    data; fp32 on the CPU, so only the fused kernels' summation order differs), and the last loss at least
    0.1 nats below the first (it learns: 0.35 for ParaGRU, 0.18 for Mamba2, whose tiny init starts above
    ln V). Mutation: pararnn_library._autograd returns a zero dx (no gradient through the cell to its input)
    -> the ParaGRU run departs from eager by up to 6.5e-3 -> fails (with the compile caches on, it passed:
    see run_train). ``compile_blocks`` never called would pass the loss checks, hence the log line."""
    eager = run_train(tmp_path / "eager", False, preset)
    compiled = run_train(tmp_path / "compiled", True, preset)
    assert len(eager) == len(compiled) == 12
    for step, (a, b) in enumerate(zip(compiled, eager), 1):
        assert a == pytest.approx(b, abs=5e-4), f"step {step}: compiled {a} vs eager {b}"
    assert compiled[-1] < compiled[0] - 0.1, compiled
    with open(tmp_path / "compiled" / "train.log") as f:
        assert "compile  2 decoder blocks" in f.read()


def test_failed_row_names_the_exception():
    """A failed ``bench_step`` row says why in one line. The stderr below is the one an H200 gave for a Triton
    compilation error (its traceback ends in the kernel's source and a caret, which the table showed as the
    reason); then an ordinary traceback, then an OOM. Mutation: the last stderr line as the reason -> fails."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_step import failure_reason

    triton_err = """Traceback (most recent call last):
  File "/opt/torch/.venv/lib/python3.12/site-packages/triton/compiler/compiler.py", line 80, in make_ir
    return ast_to_ttir(self.fn, self, context=context, options=options, codegen_fns=codegen_fns,
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
triton.compiler.errors.CompilationError: at 7:10:
def conv_silu_fwd_kernel(V, W, BIAS, POS, U, T, D, sVb, sVt, sPb, sPt,
    pos = _positions(POS, b, t, mt, sPb, sPt, HAS_POS)
          ^
"""
    assert failure_reason(triton_err, 1) == "triton.compiler.errors.CompilationError: at 7:10:"
    assert failure_reason("Traceback (most recent call last):\n  File x\nValueError: bad preset\n", 1) == \
        "ValueError: bad preset"
    assert failure_reason("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n", 1) == "out of memory"
    assert failure_reason("", 3) == "exit 3"


def test_profiler_buckets_of_cuda_kernel_names():
    """``bench_step --profile``'s bucketing on the kernel names an H200 profile holds (cuBLAS / nvjet / cutlass
    GEMMs, SDPA's cutlass and flash kernels, our Triton cell and SSD kernels, Inductor's fused kernels, fused
    AdamW) and by the op they were launched from (the loss range, the ParaRNN custom op). The CPU paths run
    in ``bench_step.py --tiny --profile``. Mutation: the GEMM rule before the mixer-kernel rule -> the cutlass
    attention kernel counts as a GEMM -> fails; the loss range after the GEMM rule -> the head GEMM -> fails;
    the fused conv kernel left out of the elementwise rule -> "other" -> fails."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_step import bucket

    cases = {
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", ()): "gemm",
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_NTN", ()): "gemm",
        ("cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x1_tn_align8", ()): "gemm",
        ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", ("aten::mm",)): "gemm",
        ("triton_tem_fused_mm_0", ()): "gemm",
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", ("aten::_efficient_attention_forward",)): "mixer",
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", ()): "mixer",
        ("gru_newton_fwd_kernel", ("pararnn::forward",)): "mixer",
        ("lstm_sweep_bwd_kernel", ()): "mixer",
        ("_chunk_scan_bwd_dx_kernel", ()): "mixer",
        ("_state_passing_fwd_kernel", ()): "mixer",
        ("triton_poi_fused_add_mul_sum_0", ("pararnn::backward",)): "mixer",  # the op's own glue
        ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", ("CompiledFunction",)): "norm_elementwise",
        ("triton_red_fused__to_copy_mul_silu_sum_3", ()): "norm_elementwise",
        ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", ()):
            "norm_elementwise",
        ("Memcpy DtoD (Device -> Device)", ()): "norm_elementwise",
        ("nvjet_tst_128x256_64x4_2x1_v_bz_TNN", ("aten::mm", "lm_loss")): "loss",
        ("triton_red_fused__log_softmax_exp_1", ("## Call CompiledFxGraph x ##", "lm_loss")): "loss",
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
         ("Optimizer.step#AdamW.step",)): "optimizer",
        ("ncclDevKernel_AllGather_RING_LL", ()): "other",
        ("conv_silu_bwd_pre_kernel", ("causal_conv::silu_bwd", "## Call CompiledFxGraph x ##")): "norm_elementwise",
    }
    for (name, parents), want in cases.items():
        assert bucket(name, list(parents)) == want, (name, parents, bucket(name, list(parents)))


def test_profiler_breakdown_attributes_kernels_to_the_ops_that_launched_them():
    """``bench_step``'s breakdown on events shaped as torch's profiler gives them (CPU ops with their parent
    op and the kernels they launched, as ``FunctionEvent.kernels``; no ``linked_correlation_id``, which the
    H200's torch 2.11 lacks: the first GPU run of ``--profile`` failed on it): each kernel's time goes to the
    bucket of its name and launching ops, per step, and a range's own GPU span (listed under the range's
    name) is not counted again, nor is a kernel listed again under CUPTI's "Command Buffer Full" marker, while
    Inductor's launch ranges (named as their kernel, no user annotation) are.
    Mutations: kernels bucketed without their parents (the head GEMM under the loss range counted as a GEMM)
    -> fails; the span filter dropped -> fails (the optimizer 10x); the filter by name alone -> fails (the
    Inductor kernel lost); "Command Buffer Full" counted -> fails (the optimizer 90x)."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Kernel

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from bench_step import breakdown

    def op(name, parent=None, kernels=(), user=False):
        return NS(name=name, cpu_parent=parent, device_type=DeviceType.CPU, is_async=False, is_user_annotation=user,
                  kernels=[Kernel(k, 0, us) for k, us in kernels], self_cpu_time_total=1.0)

    loss = op("lm_loss", user=True)
    events = [loss, op("aten::mm", loss, [("nvjet_tst_128x256_64x4_2x1_v_bz_TNN", 300.0)]),
              op("aten::mm", None, [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 500.0)]),
              op("pararnn::forward", None, [("gru_newton_fwd_kernel", 200.0)]),
              adamw := op("aten::_fused_adamw_", op("Optimizer.step#AdamW.step", user=True,
                                                    kernels=[("Optimizer.step#AdamW.step", 900.0)]),  # GPU span
                          [("multi_tensor_apply_kernel", 100.0)]),
              # CUPTI's marker for a launch that waited on a full queue lists the kernel again, with a span
              # longer than the step (the H200 profile: 456 ms of AdamW in a 318-ms step)
              op("Command Buffer Full", op("cudaLaunchKernel", adamw), [("multi_tensor_apply_kernel", 9000.0)]),
              # Inductor's launch range is named as its kernel, and is no user annotation: counted
              op("triton_poi_fused_add_0", None, [("triton_poi_fused_add_0", 60.0)]),
              NS(name="gru_newton_fwd_kernel", cpu_parent=None, device_type=DeviceType.CUDA, is_async=False,
                 kernels=[])]  # the device event itself: counted once, through its op
    out = breakdown(events, steps=2)
    assert out["device"] == "cuda"
    assert out["ms"] == {**dict.fromkeys(out["ms"], 0.0), "loss": 0.15, "gemm": 0.25, "mixer": 0.1,
                         "optimizer": 0.05, "norm_elementwise": 0.03}


@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_gated_rms_norm_matches_autograd_of_the_torch_expression(norm_before_gate):
    """``gated_rms_norm`` (the ParaRNN block's output norm and Mamba2's mixer norm, with a hand-written backward
    that recomputes) against autograd through the plain expression in float64 (``nn.RMSNorm`` for the ParaRNN
    order, HF's ``MambaRMSNormGated`` for Mamba2's): value and the gradients of x, gate and weight, in fp32 to
    1e-5; and in bf16 the output stays bf16 and within bf16 rounding of the reference. Mutation: SiLU' without
    the ``g·(1 − σ)`` term -> fails (dg); the mean-projection term of dx dropped (ParaRNN order) -> fails (dx)."""
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    from models.pararnn.pararnn_norm import gated_rms_norm

    torch.manual_seed(0)
    x, g = torch.randn(2, 5, 24), torch.randn(2, 5, 24) * 2
    w = 1 + 0.3 * torch.randn(24)
    eps = 1e-5

    def reference(x, g, w):
        if norm_before_gate:
            return F.rms_norm(x, (24,), w, eps) * F.silu(g)
        return torch.func.functional_call(MambaRMSNormGated(24, eps).double(), {"weight": w}, (x, g))

    leaves = [t.double().requires_grad_() for t in (x, g, w)]
    ref = reference(*leaves)
    upstream = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    ours_in = [t.clone().requires_grad_() for t in (x, g, w)]
    out = gated_rms_norm(*ours_in, eps, norm_before_gate=norm_before_gate)
    grads = torch.autograd.grad(out, ours_in, upstream.float())
    assert torch.allclose(out.double(), ref, atol=1e-5)
    for name, a, b in zip(("x", "gate", "weight"), grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-5, rtol=1e-5), f"d{name}: {(a.double() - b).abs().max():.3g}"
    low = gated_rms_norm(x.bfloat16(), g.bfloat16(), w, eps, norm_before_gate=norm_before_gate)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.double(), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("preset", ["paragru_tiny", "paralstm_tiny"])
def test_pararnn_flops_match_flop_counter(preset):
    """The ParaRNN model FLOPs per token (training/flops.py) against FlopCounterMode over one forward + backward
    of the torch path, which sees the GEMMs only. Less the backward's recomputation of the cell's input
    projection (``save_projection = False``: ``2·d·3d/heads`` per token and layer, which MFU does not count),
    the counted FLOPs equal ours to 0.5% at d = 1024 (measured: 0.31% GRU, 0.44% LSTM below ours, which is what
    the counter leaves out: the cell and conv terms, elementwise, and the norm, conv and cell parameters that
    6·N counts as if multiplied). Mutation: the input
    embedding left in ``matmul`` -> fails (+14%); the recomputation not subtracted (P saved) -> fails (2%)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = OmegaConf.load(os.path.join(ROOT, "configs", "model", f"{preset}.yaml"))
    config = {**OmegaConf.to_container(cfg.config), "hidden_size": 1024, "num_hidden_layers": 2, "num_heads": 4,
              "mode": "parallel", "recompute_elementwise": True}  # P recomputed: one more GEMM the counter sees
    torch.manual_seed(0)
    model = build_model(cfg.arch, config, 4096)
    B, T = 1, 64
    ids = torch.randint(0, 4096, (B, T))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, position_ids=torch.arange(T).repeat(B, 1)).logits.float().sum().backward()
    counted = counter.get_total_flops() / (B * T)
    d, layers = model.config.hidden_size, model.config.num_hidden_layers
    params = sum(p.numel() for p in model.parameters())
    ours = flops_per_token("pararnn", model.config, params, mean_context=T)["model"]
    recompute = layers * 2 * d * 3 * d / model.config.num_heads
    assert counted - recompute == pytest.approx(ours, rel=5e-3)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_pararnn_recomputation_leaves_gradients_unchanged(cell):
    """The ParaRNN LM with its backward recomputations (selective checkpointing of the elementwise glue,
    the cell's projection P redone: ``recompute_elementwise=True``) against the same weights without (plain
    autograd, P saved), in float64 on packed documents: logits and every parameter gradient to 1e-10.
    Mutation: recompute_elementwise passing its tensor arguments detached (no gradient back through a
    region's input) -> fails."""
    def run(model):
        ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
        pos = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
        logits = model(input_ids=ids, position_ids=pos).logits
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=logits.dtype)
        return logits, torch.autograd.grad((logits * weights).sum(), list(model.parameters()))

    model = tiny_model(f"para{cell}_tiny", hidden_size=32, num_hidden_layers=2, mode="parallel",
                       recompute_elementwise=True).double()
    plain = tiny_model(f"para{cell}_tiny", hidden_size=32, num_hidden_layers=2, mode="parallel").double()
    plain.load_state_dict(model.state_dict())
    assert all(c.save_projection for c in plain.cells()) and not any(c.save_projection for c in model.cells())
    logits, grads = run(model)
    ref_logits, ref_grads = run(plain)
    assert torch.allclose(logits, ref_logits, rtol=1e-10, atol=1e-12)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), name


def test_recompute_projection_follows_recompute_elementwise_unless_set():
    """Which recomputation each (recompute_elementwise, recompute_projection) pair switches on: P follows the
    elementwise flag when unset, and either can be had alone (the gradients of each path are checked above and
    in test_kernels_pararnn). Mutation: ``recompute_projection`` ignored -> the (True, False) and (False, True)
    rows fail."""
    for elementwise, projection, keeps_p in [(False, None, True), (True, None, False), (True, False, True),
                                             (False, True, False)]:
        model = tiny_model("paragru_tiny", hidden_size=32, num_hidden_layers=2, mode="parallel",
                           recompute_elementwise=elementwise, recompute_projection=projection)
        assert [c.save_projection for c in model.cells()] == [keeps_p] * 2, (elementwise, projection)
        assert all(layer.rnn.recompute == elementwise for layer in model.model.layers), (elementwise, projection)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_compiled_triton_block_with_recomputation_matches_the_torch_path(cell):
    """The Triton training path at tiny size: mode "triton" (the cell's kernels and, with ``fused_conv``, the
    fused conv + SiLU kernel; here through the interpreter) with ``recompute_elementwise`` (selective
    checkpointing around the conv kernel's custom op), every block compiled with ``fullgraph=True`` as
    ``trainer.compile`` does, against the same weights in mode "parallel", eager, nothing recomputed (the
    torch conv and the torch Newton): logits and every parameter gradient in fp32 on packed documents.
    Mutation: the conv's kernel lookup caching itself in a module-level list (a side effect inside the
    checkpointed region: Dynamo refuses it; the 1B compiled rows failed so on the H200) -> fails."""
    from training.compile import compile_blocks

    def run(model):
        ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
        pos = torch.cat([torch.arange(13), torch.arange(27)]).repeat(2, 1)
        logits = model(input_ids=ids, position_ids=pos).logits
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
        return logits, torch.autograd.grad((logits * weights).sum(), list(model.parameters()))

    torch._dynamo.reset()
    fused = tiny_model(f"para{cell}_tiny", hidden_size=32, num_hidden_layers=2, mode="triton",
                       recompute_elementwise=True, recompute_projection=False, fused_conv=True)
    plain = tiny_model(f"para{cell}_tiny", hidden_size=32, num_hidden_layers=2, mode="parallel")
    plain.load_state_dict(fused.state_dict())
    compile_blocks(fused)
    logits, grads = run(fused)
    ref_logits, ref_grads = run(plain)
    scale = lambda t: t.abs().max().item()  # noqa: E731
    assert (logits - ref_logits).abs().max().item() <= 1e-4 * scale(ref_logits)
    for (name, _), a, b in zip(fused.named_parameters(), grads, ref_grads):
        assert (a - b).abs().max().item() <= 1e-4 * scale(b), name
