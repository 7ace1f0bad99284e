"""Checkpoints: every format, safe loading, key mapping, data-free analysis, bad files."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from nndiag import UsageError, examples, inspect_checkpoint
from nndiag.checkpoints import load_checkpoint, load_into
from nndiag.checkpoints import static as static_module
from nndiag.checkpoints.static import tensor_stats
from nndiag.checkpoints.weights import find_weights


def assert_same_weights(checkpoint, reference: dict[str, torch.Tensor]) -> None:
    loaded = checkpoint.state_dict()
    assert list(loaded) == list(reference)
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key


def test_plain_state_dict_zip_legacy_and_bin(tmp_path):
    model = examples.resnet_bn(widths=(8, 16), blocks=1)
    state = model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save(state, tmp_path / "pytorch_model.bin")
    for name in ("model.pt", "legacy.pth", "pytorch_model.bin"):
        checkpoint = load_checkpoint(tmp_path / name)
        assert checkpoint.format == "state_dict"
        assert_same_weights(checkpoint, state)


def test_views_and_non_contiguous_tensors_read_back_exactly(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state = {"a.weight": base, "b.weight": base.t(), "c.weight": base[2:4, 3:7],
             "d.weight": torch.zeros(0, 3), "e.scalar": torch.tensor(3.5)}
    torch.save(state, tmp_path / "views.pt")
    assert_same_weights(load_checkpoint(tmp_path / "views.pt"), state)


def test_training_checkpoint_bundle(tmp_path):
    model = examples.he_mlp(depth=3, width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    model(torch.randn(4, 32)).sum().backward()
    optimizer.step()
    torch.save({"model_state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
                "epoch": 17, "best_loss": 0.25}, tmp_path / "train.pt")
    checkpoint = load_checkpoint(tmp_path / "train.pt")
    assert (checkpoint.format, checkpoint.weights_key) == ("training_checkpoint",
                                                           "model_state_dict")
    assert checkpoint.extras["epoch"] == "17"
    assert "optimizer state for 6 parameters" in checkpoint.extras["optimizer"]
    assert_same_weights(checkpoint, model.state_dict())


def test_lightning_style_checkpoint_without_lightning(tmp_path):
    model = examples.dead_relu_mlp()
    state = {f"net.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.6.0",
                "state_dict": state, "optimizer_states": [{"state": {}, "param_groups": []}],
                "lr_schedulers": [], "hyper_parameters": {"lr": 0.1}}, tmp_path / "last.ckpt")
    checkpoint = load_checkpoint(tmp_path / "last.ckpt")
    assert checkpoint.format == "lightning" and checkpoint.weights_key == "state_dict"
    fresh = examples.dead_relu_mlp()
    result = load_into(fresh, checkpoint)
    assert result.prefix_removed == "net."


def test_real_lightning_checkpoint_written_by_trainer(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = examples.dead_relu_mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    data = torch.utils.data.TensorDataset(torch.randn(32, 32), torch.randint(0, 10, (32,)))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)

    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "lightning"
    assert "optimizer_states" in checkpoint.extras and checkpoint.extras["global_step"] == "2"
    assert all(entry.name.startswith("net.") for entry in checkpoint.entries)
    # live inspection through the architecture: the -3 biases leave ReLUs dead
    report = inspect_checkpoint(path, examples.dead_relu_mlp(), (torch.randn(64, 32), None))
    assert report.finding("dead_relu") is not None
    assert any("prefix 'net.' removed" in note for note in report.notes)


def test_safetensors_written_by_the_library_match_our_reader(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {k: v.contiguous() for k, v in examples.lstm_classifier().state_dict().items()}
    state["half"] = torch.randn(3, 5).half()
    state["ints"] = torch.arange(7)
    safetensors_torch.save_file(state, tmp_path / "model.safetensors",
                                metadata={"format": "pt"})
    checkpoint = load_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.format == "safetensors"
    assert checkpoint.extras == {"metadata.format": "pt"}
    library = safetensors_torch.load_file(tmp_path / "model.safetensors")
    ours = checkpoint.state_dict()
    assert set(ours) == set(library)
    for key, value in library.items():
        assert torch.equal(ours[key], value), key


def test_sharded_hugging_face_directory_with_index(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = examples.transformer_preln(layers=2, dim=32).state_dict()
    keys = list(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for file, names in shards.items():
        safetensors_torch.save_file({k: state[k].contiguous() for k in names}, tmp_path / file)
        weight_map.update(dict.fromkeys(names, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 32}))
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.format == "hf_directory" and len(checkpoint.files) == 2
    assert checkpoint.extras["config.model_type"] == "tiny"
    loaded = checkpoint.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    report = inspect_checkpoint(tmp_path)
    assert report.summary["format"] == "hf_directory" and report.status == "ok"


def test_directory_without_an_index_reads_its_model_file_or_its_shards_never_a_medley(tmp_path):
    """The standard single file beside an adapter is read alone (and the adapter named as not
    read); one complete set of unindexed shards is read together (a variant set beside it is
    not read, a missing shard is refused); two unrelated files are refused."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = {k: v.contiguous() for k, v in examples.he_mlp(depth=3, width=8).state_dict().items()}
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    safetensors_torch.save_file(state, model_dir / "model.safetensors")
    safetensors_torch.save_file({"lora_A.weight": torch.zeros(2, 8)},
                                model_dir / "adapter_model.safetensors")
    checkpoint = load_checkpoint(model_dir)
    assert set(checkpoint.state_dict()) == set(state)
    assert checkpoint.extras["not read"] == "adapter_model.safetensors"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = list(state)
    safetensors_torch.save_file({k: state[k] for k in keys[:2]},
                                sharded / "model-00001-of-00002.safetensors")
    safetensors_torch.save_file({k: state[k] for k in keys[2:]},
                                sharded / "model-00002-of-00002.safetensors")
    safetensors_torch.save_file({k: state[k].half() for k in keys},  # a variant set beside
                                sharded / "model.fp16-00001-of-00001.safetensors")
    torch.save({}, sharded / "training_args.bin")  # a Trainer's, not weights
    checkpoint = load_checkpoint(sharded)
    assert set(checkpoint.state_dict()) == set(state)
    assert all(t.dtype == torch.float32 for t in checkpoint.state_dict().values())
    assert checkpoint.extras["not read"] == "model.fp16-00001-of-00001.safetensors"
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UsageError, match="'model-00002-of-00002.safetensors' are missing"):
        load_checkpoint(sharded)

    runs = tmp_path / "runs"
    runs.mkdir()
    for epoch in (1, 2):
        torch.save(state, runs / f"epoch={epoch}.ckpt")
    with pytest.raises(UsageError, match="2 weight files and no shard index"):
        load_checkpoint(runs)


def test_directory_with_a_bin_file_and_a_missing_shard(tmp_path):
    torch.save(examples.he_mlp(depth=3, width=8).state_dict(), tmp_path / "pytorch_model.bin")
    assert load_checkpoint(tmp_path).format == "hf_directory"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"a": "pytorch_model-00001-of-00002.bin"}}))
    with pytest.raises(UsageError, match="missing"):
        load_checkpoint(broken)


def test_torchscript_archive_data_free_and_live(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(examples.normal_init_mlp()).save(str(path))
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "torchscript" and checkpoint.module is None  # code not run
    assert load_checkpoint(path, unsafe_load=True).module is not None
    static = inspect_checkpoint(path)
    assert static.finding("poor_initialization").severity == "error"
    with pytest.raises(UsageError, match="--unsafe-load"):
        inspect_checkpoint(path, input_shape=(16, 32))
    live = inspect_checkpoint(path, input_shape=(16, 32), unsafe_load=True)
    assert live.schema == "nndiag.inspect/1"
    assert live.finding("exploding_gradients") is not None
    first = next(r for r in live.layers if r["name"] == "0")
    assert first["kind"] == "Linear" and first["grad_norm"] > 0


class PickledNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)


def test_pickled_module_needs_unsafe_load(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(PickledNet(), path)
    with pytest.raises(UsageError, match="--unsafe-load") as caught:
        load_checkpoint(path)
    assert "PickledNet" in str(caught.value)
    checkpoint = load_checkpoint(path, unsafe_load=True)
    assert checkpoint.format == "pickled_module"
    assert [e.name for e in checkpoint.entries] == ["fc.weight", "fc.bias"]


class _Marker:
    """Unpickling this creates a file: the proof that loading ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_code_carrying_pickle_is_refused_and_runs_nothing(tmp_path):
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(2, 2), "payload": _Marker(str(marker))}, path)
    result = CliRunner().invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    assert "--unsafe-load" in result.stderr and "run code" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    legacy = tmp_path / "evil_legacy.pt"
    torch.save({"payload": _Marker(str(marker))}, legacy, _use_new_zipfile_serialization=False)
    assert CliRunner().invoke(app, ["inspect", str(legacy)]).exit_code == 2
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b"PK\x03\x04broken",
                                     b"\x80\x02garbage", b"{\"json\": true}"])
def test_unreadable_files_are_usage_errors(tmp_path, content):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UsageError):
        inspect_checkpoint(path)


def test_missing_path_and_directory_without_weights(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="holds no weights"):
        load_checkpoint(tmp_path)


def _valid_files(tmp_path: Path) -> list[Path]:
    state = examples.he_mlp(depth=3, width=16).state_dict()
    files = [tmp_path / "zip.pt", tmp_path / "legacy.pt"]
    torch.save(state, files[0])
    torch.save(state, files[1], _use_new_zipfile_serialization=False)
    try:
        from safetensors.torch import save_file
    except ImportError:
        return files
    files.append(tmp_path / "model.safetensors")
    save_file(state, files[-1])
    return files


def test_fuzz_truncations_and_random_bytes_never_escape_as_tracebacks(tmp_path):
    rng = random.Random(0)
    outcomes = {"ok": 0, "usage": 0}
    for source in _valid_files(tmp_path):
        data = source.read_bytes()
        cuts = sorted({rng.randrange(1, len(data)) for _ in range(12)} | {len(data) // 2, 9})
        for cut in cuts:
            broken = tmp_path / f"cut_{cut}{source.suffix}"
            broken.write_bytes(data[:cut])
            try:
                inspect_checkpoint(broken)
                outcomes["ok"] += 1
            except UsageError:
                outcomes["usage"] += 1
        for trial in range(6):  # flip bytes in the middle of a valid file
            mutated = bytearray(data)
            for _ in range(8):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            path = tmp_path / f"flip_{trial}{source.suffix}"
            path.write_bytes(bytes(mutated))
            try:
                inspect_checkpoint(path)
                outcomes["ok"] += 1
            except UsageError:
                outcomes["usage"] += 1
    for trial in range(20):
        path = tmp_path / f"random_{trial}.bin"
        path.write_bytes(os.urandom(rng.randrange(1, 4096)))
        with pytest.raises(UsageError):
            inspect_checkpoint(path)
    assert outcomes["usage"] > 0


def test_data_free_flags_normal_init_and_passes_he_init(tmp_path):
    torch.save(examples.normal_init_mlp().state_dict(), tmp_path / "normal.pt")
    torch.save(examples.he_mlp().state_dict(), tmp_path / "he.pt")
    bad = inspect_checkpoint(tmp_path / "normal.pt")
    finding = bad.finding("poor_initialization")
    assert finding.severity == "error" and finding.evidence["direction"] == "grows"
    assert finding.evidence["predicted_factor"] > 1e8
    assert "ReLU" in finding.explanation and finding.fixes[0].id == "he_init"
    good = inspect_checkpoint(tmp_path / "he.pt")
    assert good.status == "ok"
    assert good.schema == "nndiag.inspect-checkpoint/1"
    assert good.summary["parameters"] == sum(p.numel() for p in examples.he_mlp().parameters())


def test_data_free_does_not_chain_across_blocks_or_normalization(tmp_path):
    for name in ("residual_mlp", "resnet_bn", "transformer_preln", "lstm_classifier"):
        torch.save(getattr(examples, name)().state_dict(), tmp_path / f"{name}.pt")
        assert inspect_checkpoint(tmp_path / f"{name}.pt").status == "ok", name


def test_plain_networks_give_the_same_findings_in_every_format(tmp_path):
    """safetensors sorts its keys (``10.weight`` before ``2.weight``): chains follow the names."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    for name in ("normal_init_mlp", "resnet_bn", "inplace_relu_cnn"):
        state = {k: v.contiguous() for k, v in getattr(examples, name)().state_dict().items()}
        torch.save(state, tmp_path / f"{name}.pt")
        safetensors_torch.save_file(state, tmp_path / f"{name}.safetensors")
        reports = [inspect_checkpoint(tmp_path / f"{name}.{ext}") for ext in ("pt", "safetensors")]
        found = [[(f.id, f.severity, f.layers, f.evidence) for f in r.findings] for r in reports]
        assert found[0] == found[1], name
        chains = [{row["name"]: row["chain"] for row in r.layers} for r in reports]
        assert chains[0] == chains[1], name
    chains = {row["name"]: row["chain"] for row in reports[0].layers}
    assert chains["0"] is not None and chains["0"] != chains["3"]  # BatchNorm between them


def test_nan_weights_and_dead_batchnorm_channels(tmp_path):
    model = examples.inplace_relu_cnn()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[4].weight[:24] = 0.0  # 24 of 32 BatchNorm channels with gamma 0
        model[4].running_var.fill_(0.7)
    torch.save(model.state_dict(), tmp_path / "broken.pt")
    report = inspect_checkpoint(tmp_path / "broken.pt")
    nan = report.finding("nan_inf")
    assert nan.evidence["tensors"] == {"0.weight": 1}
    dead = report.finding("dead_channels")
    assert dead.evidence["dead_channels"] == {"4": 24} and dead.severity == "error"


def test_zero_initialized_residual_batchnorm_is_not_dead(tmp_path):
    model = examples.resnet_bn(widths=(8,), blocks=2)
    for block in model.stages:
        nn.init.zeros_(block.bn2.weight)
    torch.save(model.state_dict(), tmp_path / "zero_init.pt")
    report = inspect_checkpoint(tmp_path / "zero_init.pt")
    assert report.finding("dead_channels") is None
    assert any("zero-initialized" in note for note in report.notes)


def test_tensor_stats_against_numpy_with_chunks_and_non_finite(monkeypatch):
    monkeypatch.setattr(static_module, "CHUNK", 7)
    values = torch.randn(5, 11, generator=torch.Generator().manual_seed(0)).half()
    values[1, 3], values[4, 10] = float("nan"), float("inf")
    stats = tensor_stats("w", values)
    finite = values.double().numpy()[~torch.isnan(values) & ~torch.isinf(values)]
    assert stats.nonfinite == 2
    assert stats.rms == pytest.approx(math.sqrt((finite ** 2).mean()), rel=1e-6)
    assert stats.mean == pytest.approx(finite.mean(), rel=1e-5)
    assert (stats.shape, stats.dtype, stats.numel) == ([5, 11], "float16", 55)


def test_strict_loading_maps_prefixes_and_reports_mismatches(tmp_path):
    model = examples.he_mlp(depth=3, width=16)
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save(wrapped, tmp_path / "ddp.pt")
    fresh = examples.he_mlp(depth=3, width=16)
    assert load_into(fresh, load_checkpoint(tmp_path / "ddp.pt")).prefix_removed == "module."
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(),
                                                 model.state_dict().values(), strict=True))
    partial = dict(model.state_dict())
    partial.pop("4.weight")
    partial["extra.weight"] = torch.zeros(2)
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(UsageError, match="--non-strict"):
        load_into(examples.he_mlp(depth=3, width=16), load_checkpoint(tmp_path / "partial.pt"))
    report = inspect_checkpoint(tmp_path / "partial.pt", examples.he_mlp(depth=3, width=16),
                                input_shape=(8, 32), strict=False)
    mismatch = report.finding("checkpoint_mismatch")
    assert mismatch.evidence == {"missing": ["4.weight"], "unexpected": ["extra.weight"]}
    torch.save(examples.he_mlp(depth=3, width=8).state_dict(), tmp_path / "narrow.pt")
    with pytest.raises(UsageError, match="shapes differ"):
        load_into(examples.he_mlp(depth=3, width=16), load_checkpoint(tmp_path / "narrow.pt"))


def test_find_weights_prefers_the_model_over_other_tensor_dicts():
    weights = {"a.weight": torch.ones(3, 3), "a.bias": torch.ones(3)}
    located = find_weights({"ema": {"x": torch.ones(1)}, "model": weights, "step": 4})
    assert located.key == "model" and set(located.weights) == set(weights)
    assert find_weights({"epoch": 3}) is None
    assert find_weights([1, 2]) is None


def _schema(name: str) -> dict:
    from importlib import resources

    return json.loads(resources.files("nndiag").joinpath(f"schemas/{name}").read_text())


def test_cli_data_free_json_exit_codes_and_plot(tmp_path):
    import jsonschema
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    runner = CliRunner()
    torch.save(examples.normal_init_mlp().state_dict(), tmp_path / "normal.pt")
    torch.save(examples.he_mlp().state_dict(), tmp_path / "he.pt")
    result = runner.invoke(app, ["inspect", str(tmp_path / "normal.pt"), "--json", "--plot",
                                 str(tmp_path / "scales.png")])
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, _schema("inspect-checkpoint-1.schema.json"))
    assert report["findings"][0]["id"] == "poor_initialization"
    assert (tmp_path / "scales.png").read_bytes()[:4] == b"\x89PNG"
    text = runner.invoke(app, ["inspect", str(tmp_path / "he.pt")])
    assert text.exit_code == 0 and "no problem found" in text.stdout
    assert "Weights by module" in text.stdout


def test_cli_checkpoint_with_model_and_data(tmp_path):
    import jsonschema
    from typer.testing import CliRunner

    from nndiag.cli.app import app

    runner = CliRunner()
    model = examples.dead_relu_mlp()
    torch.save({"net": model.state_dict(), "epoch": 9}, tmp_path / "bundle.pt")
    args = ["inspect", str(tmp_path / "bundle.pt"), "--model", "nndiag.examples:dead_relu_mlp",
            "--input-shape", "32,32", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    jsonschema.validate(report, _schema("inspect-1.schema.json"))
    assert report["findings"][0]["id"] == "dead_relu"
    assert report["summary"]["checkpoint"]["extras"] == {"epoch": "9"}
    wrong = runner.invoke(app, ["inspect", str(tmp_path / "bundle.pt"), "--model",
                                "nndiag.examples:he_mlp", "--input-shape", "32,32"])
    assert wrong.exit_code == 2 and "does not fit --model" in wrong.stderr
    no_data = runner.invoke(app, ["inspect", str(tmp_path / "bundle.pt"), "--model",
                                  "nndiag.examples:dead_relu_mlp"])
    assert no_data.exit_code == 2 and "--data or --input-shape" in no_data.stderr
    for bad in (b"", b"not a checkpoint", b"PK\x03\x04truncated"):
        (tmp_path / "bad.pt").write_bytes(bad)
        broken = runner.invoke(app, ["inspect", str(tmp_path / "bad.pt")])
        assert broken.exit_code == 2 and "Traceback" not in broken.stderr
        assert broken.stderr.startswith("error:")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert runner.invoke(app, ["inspect", str(empty_dir)]).exit_code == 2
