"""The architecture zoo: judgement that holds on every architecture people train.

Each architecture of ``tests/fixtures/arch_zoo.py`` (small configs of the ``transformers`` model
classes at their library's default init, and hand-written ones) is inspected live, data-free
from its saved state dict, and (one per family) through the CI gate:

- at its default init it gets no warning or error, unless that init is truly broken, which a
  test here verifies by training;
- sabotaged the way its family goes wrong, it is caught live and data-free alike, with fixes
  that fit the architecture.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from docs.zoo_table import ids as table_cell
from nndiag import check_training, inspect_checkpoint, inspect_model
from nndiag.cli.app import app
from tests.fixtures.arch_zoo import ZooEntry, entry, zoo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ZOO = zoo()
FAMILIES = sorted({e.family for e in ZOO})
# Fixes that never fit a network built around attention or normalization already there.
TRANSFORMER_FAMILIES = {"vision-transformer", "audio", "encoder", "decoder", "encoder-decoder",
                        "moe", "state-space"}
NOT_FOR_TRANSFORMERS = {"batch_norm", "he_init", "non_saturating_activation"}


def _documented() -> dict[str, list[str]]:
    """The rows of the documentation's zoo table, by architecture."""
    text = (Path(__file__).parent.parent / "docs" / "architecture-zoo.md").read_text()
    rows = [line.strip("|").split(" | ") for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| architecture")]
    return {row[0].strip(): [cell.strip() for cell in row] for row in rows}


DOCUMENTED = _documented()


def _ids(report) -> dict[str, str]:
    return {f.id: f.severity for f in report.findings}


def _findings(report) -> list[tuple[str, str, str]]:
    return [(f.id, f.severity, f.summary) for f in report.findings]


def _live(zoo_entry: ZooEntry, model: torch.nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inspect_model(model, zoo_entry.batch(), loss=zoo_entry.loss)


def _data_free(model: torch.nn.Module, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    return inspect_checkpoint(path)


def test_the_zoo_spans_the_field_and_the_documentation_lists_it():
    assert len(ZOO) >= 45
    assert set(DOCUMENTED) == {e.name for e in ZOO}
    assert all(DOCUMENTED[e.name][1] == e.family for e in ZOO)
    assert {"vision-cnn", "vision-transformer", "audio", "encoder", "decoder",
            "encoder-decoder", "moe", "state-space", "hand-written"} <= set(FAMILIES)
    assert len({e.name for e in ZOO}) == len(ZOO)


@pytest.mark.parametrize("zoo_entry", ZOO, ids=lambda e: e.name)
def test_default_init_is_quiet_live_and_data_free(zoo_entry, tmp_path):
    model = zoo_entry.build()
    live, data_free = _live(zoo_entry, model), _data_free(model, tmp_path)
    assert DOCUMENTED[zoo_entry.name][2] == table_cell(live)
    if zoo_entry.default_finding is None:
        assert live.status == "ok", _findings(live)
        assert data_free.status == "ok", _findings(data_free)
    else:  # a truly broken library init: verified by training below
        assert zoo_entry.default_finding in _ids(live), _findings(live)
        assert zoo_entry.default_finding in _ids(data_free), _findings(data_free)


@pytest.mark.parametrize("zoo_entry", ZOO, ids=lambda e: e.name)
def test_sabotage_is_caught_live_and_data_free_alike(zoo_entry, tmp_path):
    model = zoo_entry.build()
    zoo_entry.sabotage(model)
    live, data_free = _live(zoo_entry, model), _data_free(model, tmp_path)
    assert DOCUMENTED[zoo_entry.name][3:] == [zoo_entry.sabotage_name, table_cell(live),
                                              table_cell(data_free)]
    assert live.status != "ok", _findings(live)
    assert data_free.status != "ok", _findings(data_free)
    # The same weights, read with data or without: the data-free finding is among the live
    # ones, unless the live forward pass already overflowed (NaN says more than any scale).
    if "nan_inf" not in _ids(live):
        assert set(_ids(data_free)) <= set(_ids(live)), (_findings(live), _findings(data_free))
    fixes = {fix.id for f in live.findings for fix in f.fixes}
    if zoo_entry.family in TRANSFORMER_FAMILIES:
        assert not fixes & NOT_FOR_TRANSFORMERS, fixes
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        assert "batch_norm" not in fixes, fixes  # never "insert BatchNorm" into a BN network


def test_efficientnet_default_init_is_truly_broken_and_the_fix_trains():
    """transformers' EfficientNet draws its BatchNorm gains like weights, N(0, 0.02).

    Trained on one learnable batch, the library's default init does not fit it; with the fix
    nndiag prints (gains back to 1) it does.
    """
    zoo_entry = entry("efficientnet")
    report = _live(zoo_entry, zoo_entry.build())
    finding = report.finding("poor_initialization")
    assert finding is not None and finding.evidence["mechanism"] == "norm_gains"
    assert finding.evidence["median_gain_rms"] < 0.05
    fix = next(f for f in finding.fixes if f.id == "norm_gain_init")
    symptom = report.finding("vanishing_gradients")  # the signal lost at every normalization
    assert symptom.evidence["explained_by"] == ["poor_initialization"]
    assert symptom.fixes[0].id == "norm_gain_init"
    assert not {"he_init", "xavier_init"} & {f.id for f in symptom.fixes}

    def final_loss(apply_fix: bool) -> float:
        model = _fixed(zoo_entry, fix.code) if apply_fix else zoo_entry.build()
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(32, 3, 32, 32, generator=generator)
        y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(40):
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return float(loss)

    broken, fixed = final_loss(False), final_loss(True)
    assert broken > 1.0  # about log(4): the classes are not learned at all
    assert fixed < 0.1 * broken
    assert _ids(_live(zoo_entry, _fixed(zoo_entry, fix.code))) == {}


def _fixed(zoo_entry: ZooEntry, code: str) -> torch.nn.Module:
    model = zoo_entry.build()
    exec(code, {"model": model, "nn": torch.nn})
    return model


# One standard model per family through the CI gate: it never fails CI on a healthy model.
GATE = {family: next(e for e in ZOO if e.family == family and e.default_finding is None)
        for family in FAMILIES}


@pytest.mark.parametrize("family", sorted(GATE))
def test_the_gate_passes_a_healthy_standard_model_of_every_family(family):
    zoo_entry = GATE[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = check_training(zoo_entry.build(), zoo_entry.batch(), loss=zoo_entry.loss,
                                steps=10)
    assert not report.fails("error"), _findings(report)


@pytest.mark.parametrize(("model", "data"), [("bert", "text_classification_batch"),
                                             ("unet", "unet_batch")])
def test_nndiag_check_on_the_command_line_passes_healthy_standard_models(model, data):
    fixture = Path(__file__).parent / "fixtures" / "arch_zoo.py"
    result = CliRunner().invoke(app, ["check", "--model", f"{fixture}:{model}",
                                      "--data", f"{fixture}:{data}", "--steps", "10"])
    assert result.exit_code == 0, result.output
