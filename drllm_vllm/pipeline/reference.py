"""The oracle: Dr.LLM routing in plain torch/transformers, no KV cache.

One request at a time; every generated token recomputes the whole sequence
through the layer path, so a repeated layer is simply applied twice. Tests
compare the vLLM path against this, token for token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..config import parse_drllm_block
from ..router import Router, decide, route_window, window_means
from ..schedule import Schedule


class Reference:
    def __init__(self, checkpoint: str | Path, dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        path = Path(checkpoint)
        config = AutoConfig.from_pretrained(path)
        self.drllm = parse_drllm_block(config)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, attn_implementation="sdpa"
        ).eval()
        self.num_layers = config.num_hidden_layers
        tensors = load_file(path / self.drllm.router_file)
        self.routers = []
        for i in range(self.num_layers):
            r = Router(config.hidden_size, self.drllm.bottleneck)
            r.load_state_dict(
                {k.split(f"model.routers.{i}.", 1)[1]: v for k, v in tensors.items()
                 if k.startswith(f"model.routers.{i}.")}
            )
            self.routers.append(r.float().eval())
        self.meta = json.loads((path / "config.json").read_text())["drllm"]

    @torch.no_grad()
    def forward(
        self,
        ids: list[int],
        schedule: Schedule | None = None,
        bias: float = 0.0,
        route_tokens: int | None = None,
        pooled: list[torch.Tensor] | None = None,
        route_start: int = 0,
        all_positions: bool = False,
    ) -> tuple[torch.Tensor, Schedule]:
        """Last-position logits and the schedule used (routed if None given).

        If `pooled` is a list, the window means each router sees (the state
        entering its layer, over the routed tokens) are appended to it.
        `all_positions` returns the logits of every position instead."""
        inner = self.model.model
        x = torch.tensor([ids])
        h = inner.embed_tokens(x)
        pos = torch.arange(len(ids))[None]
        rope = inner.rotary_emb(h, pos)
        lo, hi = route_window(len(ids), route_tokens, route_start)
        taken = []
        for i, layer in enumerate(inner.layers):
            if pooled is not None:
                pooled.append(window_means(h[0, lo:hi], self.drllm.num_windows))
            if schedule is None:
                logits = self.routers[i](window_means(h[0, lo:hi], self.drllm.num_windows))
                a = int(decide(logits[None], bias, self.drllm.may_skip(i),
                               self.drllm.may_repeat(i))[0])
            else:
                a = schedule[i]
            taken.append(a)
            for _ in range(a):
                out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
                h = out[0] if isinstance(out, tuple) else out
        h = inner.norm(h)
        return self.model.lm_head(h[0] if all_positions else h[0, -1]), tuple(taken)

    def generate(
        self,
        ids: list[int],
        max_tokens: int,
        schedule: Schedule | None = None,
        bias: float = 0.0,
        route_tokens: int | None = None,
        stop_at_eos: bool = True,
        route_start: int = 0,
    ) -> tuple[list[int], Schedule]:
        """Greedy tokens; the schedule is fixed on the prompt, then followed."""
        ids = list(ids)
        out: list[int] = []
        eos = self.model.config.eos_token_id
        for _ in range(max_tokens):
            logits, schedule = self.forward(ids, schedule, bias, route_tokens,
                                            route_start=route_start)
            tok = int(logits.argmax())
            out.append(tok)
            ids.append(tok)
            if stop_at_eos and tok == eos:
                break
        return out, schedule
