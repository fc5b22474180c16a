"""Compiled decoder layers: one inductor graph that every layer shares.

The routed layer loop (model.py) branches on data, so it stays in Python;
what it calls for each (layer, row set) is `LayerGraph`, a torch.compile'd
`layer(positions, hidden, residual)`:

- Traced once by Dynamo, with the token dimension dynamic, and compiled by
  inductor with vLLM's own CPU inductor options (what `vllm serve` uses for
  the whole model): RMSNorm, rotary embedding, SiLU-and-mul and the residual
  adds fuse into a few C++ kernels; vLLM's GEMMs (oneDNN / packed weights)
  and its attention stay the custom ops they are in eager mode.
- Everything that differs between layers is a graph input: weights, oneDNN
  handles, the rotary cache, and the attention layer's name (vLLM 0.32 on
  torch >= 2.11 passes it as an opaque `LayerName` input). So one graph
  serves all L layers and every repeat pass, and a row subset of any size
  reuses it (attention reads the per-subset metadata the runner swaps into
  the forward context at run time).
- After the trace, calls skip Dynamo: `__call__` feeds the compiled graph
  directly, with each layer's inputs looked up once and cached. Dynamo's
  guards would otherwise be paid 30-60 times a step; vLLM drops them too
  (`TorchCompileWithNoGuardsWrapper`). The input list comes from Dynamo's
  own record of where each graph input came from (its source).
- When AOT autograd passes those inputs through unchanged (checked at
  compile time: the graph it hands inductor has exactly Dynamo's inputs and
  two outputs, so none were deduplicated or added for mutations), calls
  also skip its runtime wrappers and run inductor's generated code
  itself: the wrappers cost about 40 us a call on CPU (cProfile, one core),
  paid for every layer.

Steps in which every row runs every layer do not come here: they call the
base model's forward, which vLLM compiles whole (`DrModelMixin.forward`).
"""

from __future__ import annotations

import types
from typing import Any

import torch

# the arguments of `_decoder_layer` that change from call to call
_PER_CALL = ("positions", "hidden", "residual", "keep")


def _decoder_layer(layer, positions, hidden, residual, keep):
    out_hidden, out_residual = layer(positions, hidden, residual)
    if keep is None:
        return out_hidden, out_residual
    # rows to leave as they were: selected in the graph's own elementwise code
    return torch.where(keep, hidden, out_hidden), torch.where(keep, residual, out_residual)


class LayerGraph:
    """`layer(positions, hidden, residual) -> (hidden, residual)`, compiled once
    for all decoder layers of one model.

    Shapes: positions [T] int64; hidden and residual [T, hidden_size] in the
    model dtype, T any number of tokens >= 1 (the first call fixes nothing but
    the rank and dtypes). `residual` must be a tensor (zeros before layer 0).
    With `keep=True` the graph takes a fourth input, keep [T, 1] bool, and
    returns the input hidden and residual unchanged on the tokens where it is
    True (rows that skip a layer run with the others: model.py), in one
    elementwise pass fused with the layer's own code.
    The first call traces and compiles (seconds to a minute on 2 cores);
    `compiled` says whether that has happened.
    """

    def __init__(self, inductor_options: dict[str, Any], keep: bool = False):
        self.options = dict(inductor_options)
        self.keep = keep
        # A code object of its own, so that Dynamo's cache (keyed by code)
        # never hands this model's graph to another model (or to the other
        # variant) in the process: guards are skipped, so nothing would tell
        # the two apart.
        code = _decoder_layer.__code__.replace(co_name=f"drllm_layer_graph_{id(self)}")
        fn = types.FunctionType(code, _decoder_layer.__globals__, code.co_name)
        self._dynamo = torch.compile(
            fn, fullgraph=True, dynamic=False, backend=self._backend,
            options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )
        self._graph = None  # the inductor-compiled graph, once traced
        self._direct = None  # inductor's generated code, when AOT passes inputs through
        self._inputs: list[tuple[str, Any]] | None = None  # how to build its inputs
        self._per_call: list[tuple[int, Any]] = []  # (input index, getter) per call
        self._layer_inputs: dict[tuple[int, int], list] = {}

    @property
    def compiled(self) -> bool:
        return self._graph is not None

    @property
    def direct(self) -> bool:
        """Whether calls skip AOT autograd's runtime wrappers (see module doc)."""
        return self._direct is not None

    def __call__(self, layer, positions, hidden, residual, keep=None):
        if (keep is None) == self.keep:
            raise ValueError(f"this LayerGraph was built with keep={self.keep}; "
                             f"got keep={'None' if keep is None else 'a mask'}")
        if self._graph is None:
            for t in (positions, hidden, residual, keep):
                if t is not None:
                    torch._dynamo.mark_dynamic(t, 0)
        if self._inputs is None:  # first call, or inputs of a kind we do not rebuild
            return self._dynamo(layer, positions, hidden, residual, keep)
        args = list(self._fixed_inputs(layer))
        for i, get in self._per_call:
            args[i] = get(positions, hidden, residual, keep)
        if self._direct is not None:
            return tuple(self._direct(args))
        return tuple(self._graph(*args))

    # -- compilation ----------------------------------------------------------
    def _backend(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx, compile_fx_inner

        self._inputs = _input_plan(gm)
        if self._inputs is not None:
            args = ", ".join(_PER_CALL)
            self._per_call = [  # Dynamo's own source text, e.g. L['hidden'].size()[0]
                (i, eval(f"lambda {args}: {_local(src)}"))  # noqa: S307
                for i, (kind, src) in enumerate(self._inputs) if kind == "per_call"
            ]
        inner: dict[str, Any] = {}

        def compile_inner(aot_gm, aot_inputs, **kwargs):
            inner["code"] = out = compile_fx_inner(aot_gm, aot_inputs, **kwargs)
            inner["inputs"] = sum(n.op == "placeholder" for n in aot_gm.graph.nodes)
            inner["outputs"] = len(next(iter(aot_gm.graph.find_nodes(op="output"))).args[0])
            return out

        # AOT autograd's own cache would hand back its wrapped function without
        # calling `compile_inner`; inductor's FX graph cache still serves the code
        with torch._inductor.config.patch(self.options), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            self._graph = compile_fx(gm, example_inputs, inner_compile=compile_inner)
        self._direct = _direct_call(inner, gm) if self._inputs is not None else None
        return self._graph

    def _fixed_inputs(self, layer) -> list:
        """The graph inputs that depend only on the layer (and which attention
        it runs: the repeat pass swaps in another), looked up once."""
        attn = layer.self_attn.attn
        key = (id(layer), id(attn))
        got = self._layer_inputs.get(key)
        if got is None:
            from vllm.utils.torch_utils import _encode_layer_name

            scope = {"L": {"layer": layer}}
            got = [
                eval(src, {}, scope) if kind == "layer"  # noqa: S307
                else _encode_layer_name(attn.layer_name) if kind == "layer_name"
                else None
                for kind, src in self._inputs
            ]
            self._layer_inputs[key] = got
        return got


def _local(source: str) -> str:
    """Dynamo's source text with L['name'] written as the plain name."""
    for name in _PER_CALL:
        source = source.replace(f"L['{name}']", name)
    return source


def _direct_call(inner: dict, gm: torch.fx.GraphModule):
    """Inductor's generated `call(args)` for the graph AOT autograd handed it,
    when that graph takes exactly Dynamo's inputs and returns exactly its two
    outputs (AOT autograd then only forwards them); else None."""
    code = inner.get("code")
    dynamo_inputs = sum(n.op == "placeholder" for n in gm.graph.nodes)
    call = getattr(code, "current_callable", None)
    if call is None or inner.get("inputs") != dynamo_inputs or inner.get("outputs") != 2:
        return None
    return call


def _input_plan(gm: torch.fx.GraphModule) -> list[tuple[str, Any]] | None:
    """For each graph input, in order: ("per_call", source), ("layer", source)
    or ("layer_name", None). None when an input has no source we can rebuild
    (the calls then go through Dynamo)."""
    plan = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        arg = node.meta.get("grapharg")
        if arg is not None and type(arg._example).__name__ == "LayerName":
            plan.append(("layer_name", None))
            continue
        src = arg.source.name if arg is not None and arg.source is not None else None
        if src is None:
            return None
        if any(src.startswith(f"L['{a}']") for a in _PER_CALL):
            plan.append(("per_call", src))
        elif src.startswith("L['layer']"):
            plan.append(("layer", src))
        else:
            return None
    if sum(k == "layer_name" for k, _ in plan) > 1:
        return None  # one attention per layer; anything else goes through Dynamo
    return plan
