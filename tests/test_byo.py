"""Bring your own model: `drllm prepare --base` on small random-weight Llama
and Qwen3 folders in plain Hugging Face format, run in the real engine against
the oracle; and bad inputs refused with one line each."""

from __future__ import annotations

import json
import re

import pytest

from drllm_vllm import cli

from .conftest import make_llm, random_base, shutdown
from .test_engine import forced, params, run
from .test_qwen2 import LAYERS, SCHEDULES  # 4 layers; skips and repeats at both ends

BIASES = (0, -0.5, 0.5, 0, 0.3)
PROMPTS = ("Hello there", "A much longer prompt about the weather in the mountains today",
           "1 2 3 4 5", "Why is the sky blue?", "Short")
FAMILIES = {"llama": "DrLlamaForCausalLM", "qwen3": "DrQwen3ForCausalLM"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory, checkpoint):
    """family -> a plain HF folder of a random 4-layer model of that family."""
    return {f: random_base(tmp_path_factory, checkpoint, f, family=f, layers=LAYERS,
                           hidden=128, heads=2, kv_heads=1) for f in FAMILIES}


def prepare_cli(argv: list[str], capsys) -> tuple[str, str]:
    """Run `drllm prepare ...` in-process; (the path it printed, its stderr)."""
    cli.main(["prepare", *argv])
    captured = capsys.readouterr()
    return captured.out.strip().splitlines()[-1], captured.err


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prepare_base_writes_an_untrained_checkpoint_then_reuses_it(
        bases, family, tmp_path, capsys):
    out = tmp_path / f"{family}-drllm"
    path, err = prepare_cli(["--base", str(bases[family]), "--out", str(out)], capsys)
    assert path == str(out) and "UNTRAINED" in err and "drllm.trained is false" in err
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family]]
    assert config["drllm"]["trained"] is False
    # untrained routers allow every action, so "derived" equals "all"
    assert config["drllm"]["skip_layers"] is None
    assert config["drllm"]["repeat_layers"] == list(range(LAYERS))
    assert prepare_cli(["--base", str(bases[family]), "--out", str(out)], capsys)[1] \
        .startswith(f"[drllm prepare] using cached checkpoint {out}")
    # the base folder is untouched: no Dr architecture, no routers
    assert json.loads((bases[family] / "config.json").read_text())["architectures"] == [
        FAMILIES[family].removeprefix("Dr")]
    assert not (bases[family] / "routers.safetensors").exists()


def test_default_output_is_named_after_the_base_folder(bases, tmp_path, monkeypatch, capsys):
    from drllm_vllm.checkpoint import checkpoint_name

    monkeypatch.setenv("DRLLM_CACHE", str(tmp_path))
    path, _ = prepare_cli(["--base", str(bases["llama"]), "--allow", "all"], capsys)
    assert path == str(tmp_path / "checkpoints" / f"{bases['llama'].name}-drllm-all-layers")
    assert checkpoint_name(path) == bases["llama"].name


@pytest.mark.parametrize("family", list(FAMILIES))
def test_brought_model_schedules_and_routing_match_oracle(bases, family, tmp_path, capsys):
    from transformers import AutoTokenizer

    from drllm_vllm.pipeline.reference import Reference

    dr, _ = prepare_cli(["--base", str(bases[family]), "--out", str(tmp_path / "dr")], capsys)
    oracle = Reference(dr)
    tok = AutoTokenizer.from_pretrained(dr)
    prompts = [tok.encode(p) for p in PROMPTS]
    llm = make_llm(dr)
    try:
        together = run(llm, prompts, [forced(s) for s in SCHEDULES])
        alone = [run(llm, [p], forced(s))[0] for p, s in zip(prompts[:2], SCHEDULES[3:])]
        routed = run(llm, prompts, [params(drllm_bias=b) for b in BIASES])
    finally:
        shutdown(llm)
    refs = [oracle.generate(p, 6, schedule=s) for p, s in zip(prompts, SCHEDULES)]
    assert together == [(tokens, s) for (tokens, _), s in zip(refs, SCHEDULES)]
    assert alone == [oracle.generate(p, 6, schedule=s) for p, s in zip(prompts[:2], SCHEDULES[3:])]
    # the schedules matter: a wrong schedule would not have matched
    full = [oracle.generate(p, 6, schedule=SCHEDULES[0])[0] for p in prompts[1:]]
    assert any(f != t for f, (t, _) in zip(full, together[1:]))
    assert routed == [oracle.generate(p, 6, bias=b) for p, b in zip(prompts, BIASES)]
    assert any(s != SCHEDULES[0] for _, s in routed)  # the routers did route


def _no_config(tmp_path, bases):
    return ["--base", str(tmp_path)]


def _not_causal(tmp_path, bases):
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["BertModel"], "model_type": "bert"}))
    return ["--base", str(tmp_path)]


def _gpt2(tmp_path, bases):
    from transformers import GPT2Config

    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    return ["--base", str(tmp_path)]


def _without(*names):
    def make(tmp_path, bases):
        for f in bases["llama"].iterdir():
            if f.name not in names and not any(f.match(n) for n in names):
                (tmp_path / f.name).symlink_to(f)
        return ["--base", str(tmp_path)]
    return make


def _other_hidden_size(tmp_path, bases):
    from safetensors.torch import save_file

    from drllm_vllm.checkpoint import init_routers

    save_file(init_routers(LAYERS, 64, 128), tmp_path / "routers.safetensors")
    return ["--base", str(bases["llama"]), "--routers", str(tmp_path / "routers.safetensors"),
            "--out", str(tmp_path / "out")]


def _bare_routers_derived(tmp_path, bases):
    from safetensors.torch import save_file

    from drllm_vllm.checkpoint import init_routers

    save_file(init_routers(LAYERS, 128, 128), tmp_path / "routers.safetensors")
    return ["--base", str(bases["llama"]), "--routers", str(tmp_path / "routers.safetensors"),
            "--out", str(tmp_path / "out")]


def _no_gguf(tmp_path, bases):
    return ["--gguf", str(tmp_path / "model.gguf")]


def _not_a_checkpoint(tmp_path, bases):
    return ["train", "--checkpoint", str(bases["llama"])]


BAD_INPUTS = {
    "no config.json": (_no_config, r"is not a Hugging Face model folder: no config\.json$"),
    "not a causal LM": (_not_causal, r"holds a BertModel, not a causal LM .*accepted: "
                        r"\['LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'\]$"),
    "unsupported architecture": (_gpt2, r"architecture GPT2LMHeadModel of .* is not supported; "
                                 r"accepted: \['LlamaForCausalLM', .*\]$"),
    "no safetensors": (_without("*.safetensors"), r"has no safetensors weights"),
    "no tokenizer": (_without("tokenizer.json", "tokenizer_config.json"),
                     r"has no tokenizer \(tokenizer\.json"),
    "routers for another hidden size": (_other_hidden_size, r"routers .* do not fit .*: hidden "
                                        r"size 128 expected, found routers for hidden size 64$"),
    "routers without card or labels": (_bare_routers_derived, r"cannot derive which layers "
                                       r"may skip or repeat: .* or prepare with --allow all$"),
    "GGUF file missing": (_no_gguf, r"GGUF file .*model\.gguf does not exist$"),
    "--checkpoint of a plain model": (_not_a_checkpoint, r"no 'drllm' block"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_get_one_line_and_exit_code_2(bases, tmp_path, capsys, case):
    make, message = BAD_INPUTS[case]
    argv = make(tmp_path, bases)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv if argv[0] == "train" else ["prepare", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("drllm: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_search_gets_an_all_layers_sibling_of_a_restricted_checkpoint(bases, tmp_path):
    from safetensors.torch import load_file

    from drllm_vllm.checkpoint import (all_layers, checkpoint_name, init_routers,
                                       write_dr_checkpoint)
    from drllm_vllm.config import DrConfig

    routers = init_routers(LAYERS, 128, 128, seed=3)
    dr = write_dr_checkpoint(bases["qwen3"], tmp_path / "q3-drllm", routers,
                             DrConfig(skip_layers=(1,), repeat_layers=(2,), trained=True))
    sibling = all_layers(dr)
    assert sibling == tmp_path / "q3-drllm-all-layers" and checkpoint_name(sibling) == "q3"
    block = json.loads((sibling / "config.json").read_text())["drllm"]
    assert block["skip_layers"] is None and block["repeat_layers"] == list(range(LAYERS))
    assert block["trained"] is True
    kept = load_file(sibling / "routers.safetensors")
    assert all((kept[k] == v).all() for k, v in routers.items())
    assert json.loads((dr / "config.json").read_text())["drllm"]["repeat_layers"] == [2]
    assert all_layers(sibling) == sibling  # already allows everything


def test_sharded_base_index_gains_routers_in_the_checkpoint_only(bases, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drllm_vllm.checkpoint import plain_view, prepare_base

    base = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(bases["llama"]).save_pretrained(base, max_shard_size="20MB")
    AutoTokenizer.from_pretrained(bases["llama"]).save_pretrained(base)
    index = (base / "model.safetensors.index.json").read_text()
    dr = prepare_base(base, tmp_path / "l-drllm")
    routed = json.loads((dr / "model.safetensors.index.json").read_text())["weight_map"]
    assert routed["model.routers.3.fc2.bias"] == "routers.safetensors"
    assert (base / "model.safetensors.index.json").read_text() == index  # not written through
    plain = plain_view(dr, tmp_path / "plain")
    assert json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"] == \
        json.loads(index)["weight_map"]
    assert json.loads((plain / "config.json").read_text()) == \
        json.loads((base / "config.json").read_text())
    assert sorted(f.name for f in plain.iterdir()) == sorted(f.name for f in base.iterdir())


def test_a_bare_routers_file_is_kept_as_trained_when_every_layer_is_allowed(bases, tmp_path):
    from safetensors.torch import load_file, save_file

    from drllm_vllm.checkpoint import init_routers, prepare_base

    routers = init_routers(LAYERS, 128, 64, seed=5)
    save_file(routers, tmp_path / "routers.safetensors")
    dr = prepare_base(bases["qwen3"], tmp_path / "q-drllm", "all", tmp_path / "routers.safetensors")
    block = json.loads((dr / "config.json").read_text())["drllm"]
    assert block["trained"] is True and block["bottleneck"] == 64
    kept = load_file(dr / "routers.safetensors")
    assert kept.keys() == routers.keys() and all((kept[k] == v).all() for k, v in routers.items())
