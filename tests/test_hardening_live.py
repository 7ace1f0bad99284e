"""The commands that run the user's model leave it as found, and refuse unusable batches clearly.

- ``inspect``, ``lr-find`` and the gate (``check --model``) on models whose own forward changes
  their state (spectral norm's power iteration, weight norm's computed weight, a weight
  rescaled in place, a buffer registered or replaced, lazy modules): every parameter and buffer
  is bitwise the same afterwards, and so are the ``state_dict`` keys, each module's class and
  ``training`` flag;
- a lazy model is run as a materialized copy (lr-find used to end in an internal error);
- a batch without a sample, or nested absurdly deep, is unusable data (exit 2), not a finding
  or an internal error;
- a training step raising ``GeneratorExit`` is the user's code raising (exit 3), while
  ``KeyboardInterrupt`` still stops the check.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrizations
from torch.nn.utils import spectral_norm as old_spectral_norm
from torch.nn.utils import weight_norm as old_weight_norm
from typer.testing import CliRunner

from nndiag.capture.state import preserved_state
from nndiag.cli.app import app
from nndiag.errors import UsageError, UserCodeError
from nndiag.inspection import inspect_model
from nndiag.lrfind import lr_find
from nndiag.specs import load_object
from nndiag.training_check import check_training

runner = CliRunner()


class RescalesItself(nn.Module):
    """Rescales its own weight in place in every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.mul_(0.99)
        return self.out(torch.relu(self.fc(x)))


class RegistersState(nn.Module):
    """Registers a buffer on its first call, replaces another and swaps a weight's data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.norm = nn.BatchNorm1d(4)
        self.norm.eval()  # a submodule in another mode than its parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "seen"):
            self.register_buffer("seen", x.detach().mean(0))
        self.calls = self.calls + 1  # a new tensor in the buffer's slot
        with torch.no_grad():
            self.fc.bias.data = self.fc.bias.data * 0.5
        return self.norm(self.fc(x))


def _mlp_with(first: nn.Module) -> nn.Module:
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, 4))


MODELS = {
    "utils.spectral_norm": lambda: _mlp_with(old_spectral_norm(nn.Linear(8, 16))),
    "parametrizations.spectral_norm": lambda: _mlp_with(
        parametrizations.spectral_norm(nn.Linear(8, 16))),
    "utils.weight_norm": lambda: _mlp_with(old_weight_norm(nn.Linear(8, 16))),
    "parametrizations.weight_norm": lambda: _mlp_with(
        parametrizations.weight_norm(nn.Linear(8, 16))),
    "lazy": lambda: nn.Sequential(nn.LazyLinear(16), nn.LazyBatchNorm1d(), nn.ReLU(),
                                  nn.Linear(16, 4)),
    "rescales itself": RescalesItself,
    "registers state": RegistersState,
}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=generator),
             torch.randint(0, 4, (16,), generator=generator)) for _ in range(3)]


def _tensor_state(tensor: torch.Tensor) -> tuple[Any, ...]:
    if is_lazy(tensor):
        return type(tensor), tensor.dtype, tensor.device, None
    return type(tensor), tensor.dtype, tensor.device, tensor.shape, tensor.detach().clone()


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything the commands must leave as found, with each tensor's values copied."""
    return {
        "state_dict_keys": list(model.state_dict(keep_vars=True)),
        "parameters": {n: (id(p), _tensor_state(p)) for n, p in model.named_parameters()},
        "buffers": {n: (id(b), _tensor_state(b)) for n, b in model.named_buffers()},
        # The weight the old weight_norm/spectral_norm compute is a plain tensor attribute.
        "attributes": {(n, a): (id(v), _tensor_state(v)[:-1]) for n, m in model.named_modules()
                       for a, v in vars(m).items() if isinstance(v, torch.Tensor)},
        "attribute_values": [v.detach().clone() for m in model.modules()
                             for v in vars(m).values() if isinstance(v, torch.Tensor)],
        "modules": [(n, type(m), m.training) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    """Every parameter and buffer bitwise equal (same object, dtype, shape, device, values)."""
    after = snapshot(model)
    for key in ("state_dict_keys", "attributes", "modules"):
        assert after[key] == before[key], key
    for now, then in zip(after["attribute_values"], before["attribute_values"], strict=True):
        assert torch.equal(now, then)
    for kind in ("parameters", "buffers"):
        assert after[kind].keys() == before[kind].keys(), kind
        for name, (identity, state) in before[kind].items():
            now_identity, now = after[kind][name]
            assert now_identity == identity, name
            assert now[:-1] == state[:-1], name
            if state[-1] is not None:
                assert torch.equal(now[-1], state[-1]), name


COMMANDS = {
    "inspect": lambda model, data: inspect_model(model, data),
    "lr-find": lambda model, data: lr_find(model, data, steps=8, trial_steps=2),
    "check": lambda model, data: check_training(model, data, steps=2, overfit_steps=2),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_the_model_is_left_bitwise_as_found(kind, command):
    model = MODELS[kind]()
    before = snapshot(model)
    COMMANDS[command](model, _data())
    assert_unchanged(model, before)
    if kind == "lazy":
        assert all(is_lazy(p) for p in model[0].parameters())
        assert type(model[0]) is nn.LazyLinear


def test_the_state_is_restored_after_the_model_raised():
    class FailsLate(RescalesItself):
        def forward(self, x):
            super().forward(x)
            raise ValueError("broken after rescaling")

    model = FailsLate()
    before = snapshot(model)
    with pytest.raises(UserCodeError):
        inspect_model(model, _data())
    assert_unchanged(model, before)


def test_preserved_state_puts_each_tensor_back_in_place():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    weight, bias, running_mean = model[0].weight, model[0].bias, model[1].running_mean
    before = snapshot(model)
    versions = {name: p._version for name, p in model.named_parameters()}
    with preserved_state(model, weights=True):
        weight.data = torch.zeros(2, 2)  # another shape and storage
        running_mean.add_(1.0)
        model[1].running_var = torch.zeros(3)  # a new tensor in the buffer's slot
        model[0].register_buffer("extra", torch.ones(1))
        model[0].bias = nn.Parameter(torch.ones(3))
        model.train(False)
    assert_unchanged(model, before)
    assert model[0].weight is weight and model[0].bias is bias
    assert model[1].running_mean is running_mean
    assert bias._version == versions["0.bias"]  # untouched: not written, its version kept


def test_a_graph_built_before_inspect_can_still_be_backpropagated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, _ = _data()[0]
    pending = model(x).square().mean()  # saves the weights for its backward pass
    inspect_model(model, _data())
    pending.backward()  # fails if a saved weight's version counter moved
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("name", ["SPECTRAL", "RESCALING"])
def test_the_cli_leaves_a_module_instance_as_found(tmp_path, name):
    spec = tmp_path / "live_models.py"
    spec.write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from torch.nn.utils import spectral_norm

        torch.manual_seed(0)
        SPECTRAL = nn.Sequential(spectral_norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 4))


        class Rescaling(nn.Linear):
            def forward(self, x):
                with torch.no_grad():
                    self.weight.mul_(0.99)
                return super().forward(x)


        RESCALING = nn.Sequential(Rescaling(8, 16), nn.ReLU(), nn.Linear(16, 4))


        def data():
            g = torch.Generator().manual_seed(0)
            return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))]
    """))
    model = load_object(f"{spec}:{name}")
    before = snapshot(model)
    common = ["--model", f"{spec}:{name}", "--data", f"{spec}:data"]
    for argv in (["inspect", *common], ["lr-find", *common, "--steps", "8", "--no-trials"],
                 ["check", *common, "--steps", "2"]):
        result = runner.invoke(app, argv)
        assert result.exit_code in (0, 1), result.stderr
        assert load_object(f"{spec}:{name}") is model
        assert_unchanged(model, before)


# ------------------------------------------------------------------------------- lazy models

def test_lr_find_sweeps_a_materialized_copy_of_a_lazy_model():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    result = lr_find(model, iter(_data()), steps=8, trials=False)
    assert len(result.losses) == 8 and result.suggested_lr > 0
    assert is_lazy(model[0].weight)


def test_lr_find_refuses_an_optimizer_built_on_lazy_parameters():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(UsageError, match="lazy modules have not run yet"):
        lr_find(model, _data(), optimizer=optimizer, steps=8, trials=False)


def test_a_lazy_module_the_first_batch_does_not_reach_is_refused():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 4)
            self.spare = nn.LazyLinear(4)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(UsageError, match="did not all run on the first batch"):
        inspect_model(Branchy(), _data())


def test_the_gate_refuses_a_lazy_model_its_step_feeds_otherwise():
    def step(model, batch, optimizer):
        inputs, targets = batch["pair"]
        loss = nn.functional.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    data = [{"pair": batch} for batch in _data()]
    with pytest.raises(UsageError, match="lazy modules that have not run yet"):
        check_training(model, data, train_step=step, steps=2, overfit_steps=2)


# ------------------------------------------------------------------------------- batches

def test_an_empty_batch_is_unusable_data_everywhere():
    model = nn.Sequential(nn.Linear(8, 4))
    empty = (torch.randn(0, 8), torch.randint(0, 4, (0,)))
    for run in (lambda data: inspect_model(model, data),
                lambda data: lr_find(model, data, steps=8, trials=False),
                lambda data: check_training(model, data, steps=2, overfit_steps=2)):
        for data in (empty, [empty, *_data()], [{"x": torch.zeros(0, 8)}]):
            with pytest.raises(UsageError, match="the batch is empty"):
                run(data)


def test_a_batch_nested_absurdly_deep_is_refused_and_a_deep_one_accepted():
    class Unwraps(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            while isinstance(x, tuple):
                (x,) = x
            return self.fc(x)

    def nested(depth: int) -> Any:
        x: Any = torch.randn(16, 8)
        for _ in range(depth):
            x = (x,)
        return x

    targets = torch.randint(0, 4, (16,))
    for run in (lambda data: inspect_model(Unwraps(), data),
                lambda data: lr_find(Unwraps(), data, steps=8, trials=False),
                lambda data: check_training(Unwraps(), data, steps=2, overfit_steps=2)):
        with pytest.raises(UsageError, match="more than 64 levels deep"):
            run([(nested(5000), targets)])
        run([(nested(20), targets)])


def test_keyboard_interrupt_in_the_train_step_still_stops_the_check():
    def step(model, batch, optimizer):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_training(nn.Linear(8, 4), _data(), train_step=step, steps=2, overfit_steps=2)


# ------------------------------------------------------------------------------- CLI sweep

SPECS = '''
import torch
from torch import nn


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def lazy():
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))


def data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g))
            for _ in range(3)]


def empty_batch():
    return [(torch.randn(0, 8), torch.randint(0, 4, (0,)))]


def empty_first():
    return empty_batch() + data()


def deep():
    x = torch.randn(16, 8)
    for _ in range(5000):
        x = (x,)
    return [(x, torch.randint(0, 4, (16,)))]


def self_containing():
    inputs = [torch.randn(16, 8)]
    inputs.append(inputs)
    return [(inputs, torch.randint(0, 4, (16,)))]


class TooDeepForMe(nn.Module):
    """Refuses nesting itself: its own error, exit 3."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        raise ValueError("this model takes a tensor")


def nested_60():
    x = torch.randn(16, 8)
    for _ in range(60):
        x = (x,)
    return [((x,), torch.randint(0, 4, (16,)))]


class ExitsGenerator(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        raise GeneratorExit("from forward")


def generator_exit_step(model, batch, optimizer):
    raise GeneratorExit("from the step")


def generator_exit_loss(outputs, targets):
    raise GeneratorExit("from the loss")
'''

S = "{specs}"
D = f"{S}:data"
LAZY = f"{S}:lazy"
MLP = f"{S}:mlp"
CASES: list[tuple[str, tuple[str, ...], int]] = [
    ("inspect/lazy model", ("inspect", "--model", LAZY, "--data", D), 0),
    ("lr-find/lazy model", ("lr-find", "--model", LAZY, "--data", D, "--steps", "8",
                            "--no-trials"), 0),
    ("check/lazy model", ("check", "--model", LAZY, "--data", D, "--steps", "2"), 0),
    ("inspect/empty batch", ("inspect", "--model", MLP, "--data", f"{S}:empty_batch"), 2),
    ("inspect/empty first batch", ("inspect", "--model", MLP, "--data", f"{S}:empty_first"),
     2),
    ("inspect/zero batch size", ("inspect", "--model", MLP, "--input-shape", "0,8"), 2),
    ("lr-find/empty batch", ("lr-find", "--model", MLP, "--data", f"{S}:empty_batch"), 2),
    ("lr-find/empty val batch", ("lr-find", "--model", MLP, "--data", D, "--val-data",
                                 f"{S}:empty_batch"), 2),
    ("check/empty batch", ("check", "--model", MLP, "--data", f"{S}:empty_batch"), 2),
    ("check/empty batch, own step", ("check", "--model", MLP, "--data", f"{S}:empty_first",
                                     "--train-step", f"{S}:generator_exit_step"), 2),
    ("inspect/5000 levels deep", ("inspect", "--model", MLP, "--data", f"{S}:deep"), 2),
    ("lr-find/5000 levels deep", ("lr-find", "--model", MLP, "--data", f"{S}:deep"), 2),
    ("check/5000 levels deep", ("check", "--model", MLP, "--data", f"{S}:deep"), 2),
    ("inspect/batch containing itself", ("inspect", "--model", MLP, "--data",
                                         f"{S}:self_containing"), 2),
    ("inspect/model refusing nesting", ("inspect", "--model", f"{S}:TooDeepForMe", "--data",
                                        f"{S}:nested_60"), 3),
    ("check/GeneratorExit in the step", ("check", "--model", MLP, "--data", D, "--steps", "2",
                                         "--train-step", f"{S}:generator_exit_step"), 3),
    ("inspect/GeneratorExit in forward", ("inspect", "--model", f"{S}:ExitsGenerator",
                                          "--data", D), 3),
    ("lr-find/GeneratorExit in forward", ("lr-find", "--model", f"{S}:ExitsGenerator",
                                          "--data", D), 3),
    ("check/GeneratorExit in forward", ("check", "--model", f"{S}:ExitsGenerator", "--data",
                                        D), 3),
    ("inspect/GeneratorExit in the loss", ("inspect", "--model", MLP, "--data", D, "--loss",
                                           f"{S}:generator_exit_loss"), 3),
]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> str:
    path: Path = tmp_path_factory.mktemp("live") / "live_specs.py"
    path.write_text(SPECS)
    return str(path)


@pytest.mark.parametrize(("args", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_live_model_inputs_never_exit_4(specs, args, code):
    argv = [arg.format(specs=specs) for arg in args]
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        argv, result.exception)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert result.exit_code == code, (argv, result.exit_code, result.stderr)
    if code >= 2:
        assert result.stdout == "", result.stdout
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, result.stderr
