"""CUDA-graph decoding of the ParaRNN LM: the whole one-token step replayed as one captured graph.

After the prefill (the parallel forward over the prompt) ``generate()`` advances the recurrent cache one
token at a time. Run op by op, that step of a 24-layer model is about a thousand kernel launches of a few
microseconds of host time each for less GPU work than that, so decoding goes at the host's pace (~30
tokens/s at 1B). Here the step (embedding; per layer norm, in_proj, conv step, SiLU, cell step, gated norm,
out_proj, residual scale, MLP; final norm, LM head) is captured once per batch size as a CUDA graph over
static buffers (the token ids, every layer's conv window and cell state; the logits are the graph's
output) and replayed per token: one launch per token and no host synchronisation.

Two flavours (``config.decode_graph``):

* ``"graph"``: the graph of the pure-torch step's own kernels (:meth:`RNNBlock.decode` and the MLP), so
  tokens and logits equal the uncaptured path's bit for bit.
* ``"compiled"`` (default): the same step with each layer fused by ``torch.compile`` before the capture
  (about a quarter of the kernels). It is compiled once for all layers, since the weights are inputs of
  the compiled function, and again for the first batch size above 1 (then dynamic in the batch). The cell
  still runs its step in fp32 and stores its state in the activations' dtype, but fused kernels round
  differently (an fp32 intermediate instead of a bf16 one, another reduction order), so the logits differ
  from the uncaptured path's by about the model dtype's rounding.

Numerics shared by both: the static buffers take the shapes and dtypes the prefill left in the cache.
For a bf16 (fp32) model the conv window and the cell state are bf16 (fp32), as on the uncaptured path,
where ``cell.step`` computes in fp32 and returns its state in the input's dtype; the GEMMs run in the
model dtype.

Bookkeeping. Graphs are keyed by batch size, flavour, autocast and inference mode, and state dtypes,
captured on the first decode step of a key and kept up to ``MAX_GRAPHS`` (least recently used dropped).
A cache is *bound* to a graph while its per-layer state lists hold that graph's buffers. Binding copies
the cache's states into the buffers: after the prefill, after beam search's ``reorder_cache`` (which puts
new tensors in the lists), after ``ParaRNNCache.reset``. A cache bound before to the same graph first
gets copies of its states, so two live caches never share buffers. A new parameter storage
(``model.to(...)``) drops every graph. Only torch is needed (exports ship this file), and nothing here
runs off CUDA unless a test attaches a :class:`GraphDecoder` with ``capture=False`` (the same
bookkeeping, run eagerly).
"""
import weakref
from collections import OrderedDict

import torch
from torch import Tensor

MAX_GRAPHS = 8
# Dynamo's per-function recompile limit while we compile: one entry per (cell, dtype, batch 1 or dynamic).
_RECOMPILE_LIMIT = 64
_COMPILED: list = []


def layer_step(layer, x: Tensor, window: Tensor, state: Tensor) -> Tensor:
    """One token through one ``ParaRNNLayer`` with the uncaptured path's code; the layer's new conv window
    and cell state are written into ``window`` and ``state``."""
    x, new_window, new_state = layer.rnn.decode(x, window, state)
    window.copy_(new_window)
    state.copy_(new_state)
    return layer.mlp(x)


def compiled_layer_step():
    """:func:`layer_step` under ``torch.compile`` (made on first use: importing dynamo is not free)."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(layer_step, fullgraph=True))
    return _COMPILED[0]


def decode_step(model, input_ids: Tensor, windows: list, states: list, step=layer_step) -> Tensor:
    """The LM's one-token step over buffers: ``input_ids [B, 1]``, per-layer windows and states (read, then
    overwritten with the new ones) -> logits ``[B, 1, V]``."""
    inner = model.model
    x = inner.embed_tokens(input_ids)
    for layer, window, state in zip(inner.layers, windows, states):
        x = step(layer, x, window, state)
    return model.lm_head(inner.norm(x))


class _Graph:
    """Static buffers of one batch size, the captured graph over them, and the cache bound to them."""

    def __init__(self, cache):
        self.ids = torch.zeros(len(cache.cell_states[0]), 1, dtype=torch.long, device=cache.cell_states[0].device)
        self.windows = [torch.zeros_like(w) for w in cache.conv_states]
        self.states = [torch.zeros_like(s) for s in cache.cell_states]
        self.logits: Tensor | None = None
        self.graph = None
        self.owner = None  # weakref to the bound cache

    def bound(self, cache) -> bool:
        return (all(a is b for a, b in zip(cache.conv_states, self.windows))
                and all(a is b for a, b in zip(cache.cell_states, self.states)))

    def unbind(self) -> None:
        """Give the bound cache (if alive and still bound) its own copies of the states."""
        cache = self.owner() if self.owner is not None else None
        if cache is not None and self.bound(cache):
            cache.conv_states[:] = [w.clone() for w in self.windows]
            cache.cell_states[:] = [s.clone() for s in self.states]
        self.owner = None

    def bind(self, cache) -> None:
        if self.owner is not None and self.owner() is not cache:
            self.unbind()
        for buffer, value in zip(self.windows + self.states, cache.conv_states + cache.cell_states):
            buffer.copy_(value)
        cache.conv_states[:] = self.windows
        cache.cell_states[:] = self.states
        self.owner = weakref.ref(cache)


class GraphDecoder:
    """The decode graphs of one model (see the module docstring).

    Args:
        capture: capture CUDA graphs (False: run the same step eagerly over the same buffers, on any
            device; for tests of the bookkeeping).
        max_graphs: graphs kept (one per batch size and flavour); the least recently used is dropped.
    """

    def __init__(self, capture: bool = True, max_graphs: int = MAX_GRAPHS):
        self.capture = capture
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.weights: tuple | None = None  # parameter storages the graphs read

    def step(self, model, input_ids: Tensor, cache, flavour: str) -> Tensor:
        """Logits ``[B, 1, V]`` (a fresh tensor) of the next token ``input_ids [B, 1]``; advances ``cache``."""
        device = input_ids.device.type
        key = (input_ids.shape[0], flavour, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device),
               torch.is_inference_mode_enabled(), cache.conv_states[0].dtype, cache.cell_states[0].dtype)
        graph = self.graphs.get(key)
        if graph is None or not graph.bound(cache):
            graph = self._bind(model, key, cache)
        graph.ids.copy_(input_ids)
        if graph.graph is not None:
            graph.graph.replay()
        else:
            graph.logits = self._run(model, graph, flavour)
        cache.seen_tokens += 1
        return graph.logits.clone()

    def clear(self) -> None:
        """Drop every graph (bound caches keep copies of their states)."""
        for graph in self.graphs.values():
            graph.unbind()
        self.graphs.clear()

    def _bind(self, model, key: tuple, cache) -> _Graph:
        weights = tuple(p.data_ptr() for p in model.parameters())
        if weights != self.weights:
            self.clear()
            self.weights = weights
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._new(model, key, cache)
        self.graphs.move_to_end(key)
        graph.bind(cache)
        return graph

    def _new(self, model, key: tuple, cache) -> _Graph:
        while len(self.graphs) >= self.max_graphs:
            _, old = self.graphs.popitem(last=False)
            old.unbind()
        graph = _Graph(cache)
        if self.capture:
            flavour = key[1]
            device = graph.ids.device
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                # Warm-up off the capture: compilation, cuBLAS workspaces, the allocator's first blocks.
                for _ in range(2):
                    self._run(model, graph, flavour)
            torch.cuda.current_stream(device).wait_stream(side)
            graph.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph.graph):
                graph.logits = self._run(model, graph, flavour)
        self.graphs[key] = graph  # only once captured: a failed capture leaves no graph to run eagerly
        return graph

    @staticmethod
    @torch.no_grad()
    def _run(model, graph: _Graph, flavour: str) -> Tensor:
        if flavour != "compiled":
            return decode_step(model, graph.ids, graph.windows, graph.states)
        with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
            return decode_step(model, graph.ids, graph.windows, graph.states, compiled_layer_step())


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(model, decoder: GraphDecoder | None) -> None:
    """Use ``decoder`` for ``model``'s decode steps (None: back to the default, a capturing decoder on CUDA)."""
    if decoder is None:
        _DECODERS.pop(model, None)
    else:
        _DECODERS[model] = decoder


def graph_decode(model, input_ids: Tensor, cache) -> Tensor | None:
    """The logits of a one-token decode step through the model's graphs, or None where they do not apply
    and the caller runs the pure-torch step: ``config.decode_graph == "off"``, more than one new token,
    gradients enabled, no CUDA (unless a decoder was attached), or a model spread over several devices."""
    flavour = model.config.decode_graph
    if flavour == "off" or input_ids.shape[1] != 1 or torch.is_grad_enabled():
        return None
    decoder = _DECODERS.get(model)
    if decoder is None:
        if not input_ids.is_cuda or torch.cuda.is_current_stream_capturing():
            return None
        if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
            return None  # layers on several devices: one graph cannot hold them
        decoder = _DECODERS[model] = GraphDecoder()
    return decoder.step(model, input_ids, cache, flavour)
