"""Configuration of the ParaRNN language model (shipped with exported checkpoints)."""
import math

from transformers import PretrainedConfig

from .pararnn_op import FALLBACK_TOL

CELLS = ("gru", "lstm")
MODES = ("auto", "sequential", "parallel", "triton")
BLOCKS = ("lm", "mixer", "bare")
POSITION_ENCODINGS = (None, "sinusoidal")
DECODE_GRAPHS = ("compiled", "graph", "off")


class ParaRNNConfig(PretrainedConfig):
    """A DCLM-style decoder whose attention is replaced by a ParaGRU or ParaLSTM block (the paper's §5.2, App. C.1).

    Args:
        cell: ``"gru"`` (ParaGRU) or ``"lstm"`` (ParaLSTM).
        hidden_size: d_model; the cell's input and state width.
        num_hidden_layers: number of (RNN block, MLP block) pairs.
        num_heads: heads of the cell's block-diagonal input map (the paper: 4, or 2 at 2.9B).
        intermediate_size: SwiGLU hidden width; None gives 256·ceil(8d/3/256).
        conv_kernel: width of the causal depthwise conv before the cell.
        newton_iters: Newton iterations of the parallel cell application.
        mode: ``"auto"`` (Triton on CUDA, else the torch parallel mode), or a cell mode.
        clip: bound on |a| and |c| (diagonal recurrent weights); None disables it.
        fallback_tol: Newton residual above which a chain is solved again exactly (counted per cell as
            ``newton_fallbacks``); None disables the check.
        cell_init: ``"paper"`` or ``"reference"`` (see ``ParaRNNCell``).
        initializer_range: ``None``: everything outside the cells as DCLM (the paper's App. C.1, and our
            Transformer): truncated normals of std 1/√fan-in, residual outputs / √(2·(layer + 1)); its random head
            starts ln V + ~0.47 (logits' std ~1 at any width). A number σ: N(0, σ) and residual outputs / √(2·layers)
            (GPT-2's; the synthetic presets' 0.02, with which their table was measured).
        vocab_size: padded vocabulary (embeddings are untied).
        block: what each layer is. ``"lm"``: the RNN block then a SwiGLU MLP block (§5.1, the LMs);
            ``"mixer"``: the RNN block alone, no MLP (the paper's single-layer synthetic models, App. C.2);
            ``"bare"``: the cell alone, no norm, conv, gate, MLP or residual, and no final norm (the
            paper's † synthetic tasks, which test the recurrence itself).
        position_encoding: ``None`` or ``"sinusoidal"`` (added to the embeddings; the paper adds one
            for its Keep-nth task, which a recurrence cannot solve without knowing positions).
        recompute_elementwise: redo the blocks' norms, conv, SiLU and gating and the cell's input projection
            in the backward instead of keeping them (``pararnn_norm.recompute_elementwise``). paragru_1b at
            B8·T2048 on an H200, eager: peak 83 -> 45.5 GiB, step 427 -> 557 ms (benchmarks/RESULTS.md); off
            by default, like gradient checkpointing.
        recompute_projection: redo the cell's input projection P (3·hidden_size values per token and layer,
            one block-diagonal GEMM) in the backward instead of keeping it; ``None``: as
            ``recompute_elementwise``. ``recompute_elementwise=True, recompute_projection=False`` recomputes
            only the elementwise glue, which costs less time per byte saved than P does.
        fused_conv: in mode ``"triton"``, the block's conv + SiLU as one Triton kernel (``kernels.conv``: one read
            of the conv input and one write, where Inductor's kernels for it took ~19 ms of the compiled 1B step)
            instead of the torch form. The compiled 1B step on an H200 takes 274.6 ms with it against 287.7
            without (ParaLSTM 282.4 against 293.4; ``benchmarks/RESULTS.md``); ``False``: the torch form.
        decode_graph: how ``generate()`` decodes on CUDA after the prefill (see ``decoding.py``):
            ``"compiled"`` replays one CUDA graph per batch size of the whole one-token step with each
            layer's step fused by ``torch.compile`` (compiled on first use); ``"graph"`` replays a graph of
            the pure-torch step's own kernels (the same tokens and logits as ``"off"``, bit for bit);
            ``"off"`` runs the pure-torch step (launch-bound). Off the GPU the pure-torch step is used.
    """

    model_type = "pararnn"

    def __init__(self, cell: str = "gru", vocab_size: int = 50304, hidden_size: int = 1024,
                 num_hidden_layers: int = 24, num_heads: int = 4, intermediate_size: int | None = None,
                 conv_kernel: int = 4, newton_iters: int = 3, mode: str = "auto", clip: float | None = 0.5,
                 fallback_tol: float | None = FALLBACK_TOL,
                 cell_init: str = "paper", rms_norm_eps: float = 1e-5, initializer_range: float | None = None,
                 bos_token_id: int = 50256, eos_token_id: int = 50256, tie_word_embeddings: bool = False,
                 block: str = "lm", position_encoding: str | None = None, recompute_elementwise: bool = False,
                 recompute_projection: bool | None = None, fused_conv: bool = True, decode_graph: str = "compiled",
                 **kwargs):
        if cell not in CELLS:
            raise ValueError(f"ParaRNNConfig: cell={cell!r} is not one of {', '.join(CELLS)}")
        if mode not in MODES:
            raise ValueError(f"ParaRNNConfig: mode={mode!r} is not one of {', '.join(MODES)}")
        if block not in BLOCKS:
            raise ValueError(f"ParaRNNConfig: block={block!r} is not one of {', '.join(BLOCKS)}")
        if position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"ParaRNNConfig: position_encoding={position_encoding!r} is not None or 'sinusoidal'")
        if decode_graph not in DECODE_GRAPHS:
            raise ValueError(f"ParaRNNConfig: decode_graph={decode_graph!r} is not one of {', '.join(DECODE_GRAPHS)}")
        if hidden_size % num_heads:
            raise ValueError(f"ParaRNNConfig: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if tie_word_embeddings:
            raise ValueError("ParaRNNConfig: tie_word_embeddings must be False (the paper's models are untied)")
        self.cell = cell
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size or 256 * math.ceil(8 * hidden_size / 3 / 256)
        self.conv_kernel = conv_kernel
        self.newton_iters = newton_iters
        self.mode = mode
        self.clip = clip
        self.fallback_tol = fallback_tol
        self.cell_init = cell_init
        self.rms_norm_eps = rms_norm_eps
        self.block = block
        self.position_encoding = position_encoding
        self.initializer_range = initializer_range
        self.decode_graph = decode_graph
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.recompute_elementwise = recompute_elementwise
        self.recompute_projection = recompute_projection
        self.fused_conv = fused_conv
