"""Dr.LLM model wrappers: vLLM's in-tree causal LMs plus routers.

Each Dr* class is the stock vLLM class with three additions:
- `model.routers.{i}`: one router per decoder layer (loaded from the
  checkpoint's router file like any other weight);
- `model.repeat_attn[i]`: a second, virtual attention layer for each layer
  that may repeat, so the second pass has its own KV cache;
- a forward that walks the layers under each row's schedule, running each
  layer only on the rows that execute it.
The routed loop runs in Python (it branches on data); each layer it runs goes
through one compiled graph shared by all layers (compile.py), and steps in
which every row runs every layer use vLLM's own compiled forward; see
docs/architecture.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from . import kernels
from .batch import StepBatch
from .compile import LayerGraph
from .config import parse_drllm_block
from .router import Router, decide


def _virtual_attention(attn: Attention, layer_name: str) -> Attention:
    """An Attention like `attn` with its own name, hence its own KV cache."""
    from vllm.config import get_current_vllm_config

    vllm_config = get_current_vllm_config()
    return Attention(
        num_heads=attn.num_heads,
        head_size=attn.head_size,
        scale=attn.impl.scale,
        num_kv_heads=attn.num_kv_heads,
        cache_config=vllm_config.cache_config,
        quant_config=attn.quant_config,
        per_layer_sliding_window=attn.sliding_window,
        prefix=layer_name,
    )


class DrModelMixin:
    """Routers, repeat attention and the routed layer loop for a causal LM."""

    drllm_step: StepBatch | None = None

    def _init_drllm(self, vllm_config: VllmConfig, prefix: str) -> None:
        config = vllm_config.model_config.hf_config
        self.drllm = parse_drllm_block(config)
        router_path = Path(vllm_config.model_config.model) / self.drllm.router_file
        if Path(vllm_config.model_config.model).is_dir() and not router_path.exists():
            raise ValueError(
                f"router file {router_path} is missing: the checkpoint's drllm."
                f"router_file names it; rebuild the checkpoint with `drllm prepare`"
            )
        n = config.num_hidden_layers
        self.num_layers = n
        self.model.routers = nn.ModuleList(
            Router(config.hidden_size, self.drllm.bottleneck).float() for _ in range(n)
        )
        base = f"{prefix}." if prefix else ""
        self.layer_graph = layer_graph(vllm_config)
        # the same layer with some rows left unchanged (see _call_layer)
        self.keep_graph = layer_graph(vllm_config, keep=True)
        self.model.repeat_attn = nn.ModuleDict(
            {
                str(i): _virtual_attention(
                    self.model.layers[i].self_attn.attn,
                    # one integer per name, distinct from the real layers' indices
                    f"{base}model.repeat_layers.{n + i}.attn",
                )
                for i in self.drllm.repeat_layers
            }
        )

    # -- forward ---------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        model = self.model
        step = self.drllm_step
        if step is None:
            # Every row runs every layer (full mode, profiling and warm-up):
            # the base model's forward, which vLLM compiles whole unless eager.
            # Warm-up also compiles the shared layer graph, so that no request
            # waits for it.
            if self.layer_graph is not None and not self.layer_graph.compiled:
                self._compile_layer_graph(input_ids, positions, inputs_embeds)
            return model(input_ids, positions, intermediate_tensors, inputs_embeds)
        hidden = self._embed(input_ids, inputs_embeds)
        residual = None
        for i, layer in enumerate(model.layers):
            if step.to_route and self.drllm.has_choice(i):  # else routed rows execute i
                self._route_layer(i, step, hidden, residual)
            for repeat_pass in (False, True):
                rows = step.rows_running(i, repeat_pass)
                if not rows:
                    continue
                if residual is None and rows is not step.all_rows:
                    residual = torch.zeros_like(hidden)  # stream = hidden + 0
                hidden, residual = self._run_layer(
                    i, layer, repeat_pass, rows, step, positions, hidden, residual
                )
        if residual is None:
            return model.norm(hidden)
        hidden, _ = model.norm(hidden, residual)
        return hidden

    def _run_layer(self, i, layer, repeat_pass, rows, step, positions, hidden, residual):
        if not repeat_pass:
            return self._run_rows(layer, rows, step, positions, hidden, residual)
        with _swapped_attention(layer, self.model.repeat_attn[str(i)]):
            return self._run_rows(layer, rows, step, positions, hidden, residual)

    def _run_rows(self, layer, rows, step, positions, hidden, residual):
        """`layer` on the tokens of `rows`; every other row's state unchanged."""
        if rows is step.all_rows:  # nothing extra when every row runs it
            return self._call_layer(layer, step, positions, hidden, residual)
        others = step.rows_to_restore(rows)
        if others is not None:  # a few rows skip it: run all, keep theirs as they are
            return self._call_layer(layer, step, positions, hidden, residual, keep=others)
        name = layer.self_attn.attn.layer_name
        tok = step.token_index(rows, hidden.device)
        with step.attention_for_rows(rows, tok, name):
            h, r = self._call_layer(
                layer,
                step,
                positions[tok],
                kernels.gather_rows(hidden, tok),
                kernels.gather_rows(residual, tok),
            )
        # the gathered rows were copies, so writing back in place is safe
        kernels.scatter_rows_(hidden, tok, h)
        kernels.scatter_rows_(residual, tok, r)
        return hidden, residual

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if inputs_embeds is not None:
            return inputs_embeds
        return self.model.embed_input_ids(input_ids)

    def _compile_layer_graph(self, input_ids, positions, inputs_embeds) -> None:
        hidden = self._embed(input_ids, inputs_embeds)
        layer, residual = self.model.layers[0], torch.zeros_like(hidden)
        self.layer_graph(layer, positions, hidden, residual)
        if self.keep_graph is not None:
            keep = torch.zeros(hidden.shape[0], 1, dtype=torch.bool, device=hidden.device)
            self.keep_graph(layer, positions, hidden, residual, keep)

    def _call_layer(self, layer, step, positions, hidden, residual, keep=()):
        """One layer on the given tokens (the shared compiled graph, or eager),
        except that the rows of `keep` (rows of `step`) leave it unchanged: the
        compiled graph's variant selects their inputs in its own elementwise
        code; eager copies their states out before and back after."""
        if residual is None and self.layer_graph is not None:
            residual = torch.zeros_like(hidden)  # layer 0: hidden + 0, exactly as eager's
        if keep and self.keep_graph is not None:
            mask = step.keep_mask(keep, hidden.device)
            return self.keep_graph(layer, positions, hidden, residual, mask)
        if keep:
            idx = step.token_index(keep, hidden.device)
            saved = kernels.gather_rows(hidden, idx), kernels.gather_rows(residual, idx)
        if self.layer_graph is None:
            hidden, residual = layer(positions, hidden, residual)
        else:
            hidden, residual = self.layer_graph(layer, positions, hidden, residual)
        if keep:
            kernels.scatter_rows_(hidden, idx, saved[0])
            kernels.scatter_rows_(residual, idx, saved[1])
        return hidden, residual

    @torch.no_grad()
    def _route_layer(self, i: int, step: StepBatch, hidden, residual) -> None:
        """Fix layer i's action for the rows being routed in this step."""
        starts, lengths, bias = step.route_inputs()
        if step.route_layout is None and not hidden.is_cuda:  # for the torch path (CPU):
            # the same windows at every layer of the step; Triton lays them out on the GPU
            step.route_layout = kernels.pooling_layout(
                starts, lengths, self.drllm.num_windows, hidden.device)
        router = self.model.routers[i]
        logits, _ = kernels.route_logits(
            hidden, starts, lengths, self.drllm.num_windows,
            router.fc1.weight, router.fc1.bias, router.fc2.weight, router.fc2.bias,
            residual=residual, layout=step.route_layout,
        )
        actions = decide(logits, bias, self.drllm.may_skip(i), self.drllm.may_repeat(i))
        for r, a in zip(step.to_route, actions.tolist()):
            step.actions[r.row, i] = a


@contextmanager
def _swapped_attention(layer: nn.Module, attn: Attention):
    """Run `layer` with its attention replaced by the virtual repeat layer."""
    own = layer.self_attn.attn
    layer.self_attn.attn = attn
    try:
        yield
    finally:
        layer.self_attn.attn = own


def layer_graph(vllm_config: VllmConfig, keep: bool = False) -> LayerGraph | None:
    """The shared compiled layer graph (with a keep mask if `keep`) when vLLM
    compiles this model with inductor (its default on CPU), else None (eager:
    `--enforce-eager`, CUDA)."""
    from vllm.config import CompilationMode

    cc = vllm_config.compilation_config
    if cc.mode in (None, CompilationMode.NONE) or cc.backend != "inductor":
        return None
    return LayerGraph(cc.inductor_compile_config, keep=keep)


def _dr_class(base: type) -> type:
    class Dr(DrModelMixin, base):
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._init_drllm(vllm_config, prefix)

    Dr.__name__ = Dr.__qualname__ = f"Dr{base.__name__}"
    return Dr


DrLlamaForCausalLM = _dr_class(LlamaForCausalLM)
DrQwen2ForCausalLM = _dr_class(Qwen2ForCausalLM)
DrQwen3ForCausalLM = _dr_class(Qwen3ForCausalLM)

__all__ = ["DrLlamaForCausalLM", "DrQwen2ForCausalLM", "DrQwen3ForCausalLM"]
