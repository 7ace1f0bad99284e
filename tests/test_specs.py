"""Spec loading and batch unpacking."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nndiag.batches import iter_batches, synthetic_batches, unpack_batch
from nndiag.errors import UsageError, UserCodeError, UserExit, user_code, validate_seed
from nndiag.losses import IGNORE_INDEX, compute_loss, resolve_loss, synthetic_targets
from nndiag.optimizers import optimizer_factory, validate_lr
from nndiag.specs import call_model, load_data, load_model, load_object, require_usable_model


def write(tmp_path, name: str, body: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_file_spec_with_a_sibling_import(tmp_path):
    write(tmp_path, "layers.py", "import torch.nn as nn\nWIDTH = 6\n")
    path = write(tmp_path, "train.py", """
        import torch.nn as nn
        from layers import WIDTH

        def build():
            return nn.Linear(WIDTH, 2)

        net = nn.Linear(3, 1)
    """)
    assert isinstance(load_model(f"{path}:net"), nn.Linear)
    model = load_model(f"{path}:build")
    assert model.in_features == 6


def test_module_spec_with_dotted_attribute():
    assert load_object("nndiag.examples:INPUT_SHAPES.get")("he_mlp") == "64,32"


def test_import_error_inside_user_module_is_user_code(tmp_path):
    path = write(tmp_path, "broken.py", "import no_such_dependency_xyz\nnet = 1\n")
    with pytest.raises(UserCodeError, match="no_such_dependency_xyz"):
        load_model(f"{path}:net")
    path = write(tmp_path, "syntax.py", "def f(:\n")
    with pytest.raises(UserCodeError, match="SyntaxError"):
        load_model(f"{path}:f")


def test_factory_needing_arguments_is_a_usage_error(tmp_path):
    path = write(tmp_path, "needs.py", "def build(width):\n    return None\n")
    with pytest.raises(UsageError, match="no arguments"):
        load_model(f"{path}:build")


def test_data_factory_is_called_and_a_dataloader_is_not(tmp_path):
    path = write(tmp_path, "data.py", """
        import torch
        from torch.utils.data import DataLoader, TensorDataset

        def batches():
            return [(torch.ones(2, 3), torch.zeros(2))]

        loader = DataLoader(TensorDataset(torch.ones(10, 3), torch.zeros(10)), batch_size=4)
    """)
    assert len(load_data(f"{path}:batches")) == 1
    loaded = iter_batches(load_data(f"{path}:loader"), limit=2)
    assert [b.inputs.shape[0] for b in loaded] == [4, 4]


def test_one_batch_or_many():
    x, y = torch.ones(4, 3), torch.zeros(4)
    assert len(iter_batches((x, y), 5)) == 1  # a tuple is one batch
    assert iter_batches(x, 5)[0].targets is None  # a tensor is inputs only
    assert len(iter_batches([(x, y), (x, y), (x, y)], 2)) == 2  # a list yields batches
    assert iter_batches({"a": x}, 3)[0].inputs.keys() == {"a"}
    assert len(iter_batches((b for b in [(x, y)] * 3), 10)) == 3
    with pytest.raises(UsageError, match="no batch"):
        iter_batches([], 1)
    with pytest.raises(UsageError, match="a batch must be"):
        unpack_batch((x, y, y))
    with pytest.raises(UsageError, match="hold no tensor"):
        unpack_batch(("text", y))


def test_iterating_user_data_that_raises_is_user_code():
    def broken():
        yield (torch.ones(2, 2), None)
        raise OSError("disk gone")

    with pytest.raises(UserCodeError, match="disk gone"):
        iter_batches(broken(), 5)


def test_losses_by_name_and_spec():
    assert resolve_loss(None).name == "auto"
    assert resolve_loss("mse").fn is torch.nn.functional.mse_loss
    assert resolve_loss("torch.nn:CrossEntropyLoss").user_code
    with pytest.raises(UsageError, match="unknown loss"):
        resolve_loss("hinge")


# ------------------------------------------------------------------ issue 12: the library side


def test_sys_exit_in_user_code_is_a_user_code_error(tmp_path):
    exiting = write(tmp_path, "exiting.py", "import sys\nsys.exit(5)\n")
    with pytest.raises(UserCodeError, match=r"SystemExit\(5\)"):
        load_model(f"{exiting}:net")
    path = write(tmp_path, "factories.py", """
        import sys
        from torch import nn

        def build():
            sys.exit("no model today")

        class Quits(nn.Module):
            def forward(self, x):
                sys.exit()

        def loss(outputs, targets):
            sys.exit(2)

        def optimizer(params, lr):
            sys.exit(3)
    """)
    with pytest.raises(UserCodeError, match="no model today"):
        load_model(f"{path}:build")
    with pytest.raises(UserExit) as caught:
        call_model(load_object(f"{path}:Quits")(), torch.ones(1))
    assert caught.value.code is None and caught.value.exit_code == 3
    with pytest.raises(UserCodeError, match=r"--loss .* SystemExit\(2\)"):
        compute_loss(resolve_loss(f"{path}:loss"), torch.ones(2, 3, requires_grad=True),
                     torch.zeros(2, dtype=torch.long), torch.Generator())
    with pytest.raises(UserCodeError, match=r"--optimizer .* SystemExit\(3\)"):
        optimizer_factory(f"{path}:optimizer")([nn.Parameter(torch.ones(1))], 0.1)


def test_user_code_passes_other_exceptions_through():
    with pytest.raises(KeyError), user_code():
        raise KeyError("x")


def logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 5, (12,), generator=g)
    labels[::4] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("name", ["auto", "cross_entropy", "nll"])
def test_targets_of_minus_100_are_ignored_as_torch_ignores_them(name):
    logits, labels = logits_and_labels()
    value, used, classes = compute_loss(resolve_loss(name), logits, labels, torch.Generator())
    reference = F.nll_loss if name == "nll" else F.cross_entropy
    assert torch.allclose(value, reference(logits, labels))  # torch's default ignore_index
    assert classes == 5 and used == ("nll" if name == "nll" else "cross_entropy")


def test_padded_sequence_labels_in_the_hugging_face_layout():
    """Logits (N, T, V) and labels (N, T) padded with -100, as a language model returns them."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 11, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    labels[1, :2] = IGNORE_INDEX
    value, _, classes = compute_loss(resolve_loss(None), logits, labels, torch.Generator())
    assert torch.allclose(value, F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1)))
    assert classes == 11


def test_other_negative_labels_and_all_ignored_batches_are_refused():
    logits, labels = logits_and_labels()
    labels[1] = -1
    with pytest.raises(UsageError, match=r"\[-1, .*or -100 to ignore"):
        compute_loss(resolve_loss(None), logits, labels, torch.Generator())
    with pytest.raises(UsageError, match="every class target is -100"):
        compute_loss(resolve_loss(None), logits, torch.full((12,), IGNORE_INDEX),
                     torch.Generator())


def test_synthetic_targets_stay_inside_the_classes():
    labels = synthetic_targets(torch.zeros(64, 3), torch.Generator().manual_seed(0))
    assert int(labels.min()) >= 0 and int(labels.max()) < 3


def meta_mlp() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))


def test_models_nndiag_cannot_run_are_usage_errors():
    from nndiag import inspect_model, lr_find

    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,)))]
    with pytest.raises(UsageError, match="'meta' device"):
        inspect_model(meta_mlp(), input_shape=(4, 4))
    with pytest.raises(UsageError, match="'meta' device"):
        lr_find(meta_mlp(), data, steps=10)
    frozen = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(UsageError, match="no trainable parameter"):
        lr_find(frozen, data, steps=10)
    with pytest.raises(UsageError, match="no trainable parameter"):
        lr_find(nn.ReLU(), data, steps=10)
    assert require_usable_model(frozen) is frozen  # inspecting a frozen model is allowed here
    with pytest.raises(UsageError, match="expected an nn.Module"):
        require_usable_model(lambda x: x)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**23, 1.5, True])
def test_seeds_a_generator_refuses_are_usage_errors(seed):
    from nndiag import inspect_model, lr_find

    with pytest.raises(UsageError, match="64 bits"):
        inspect_model(nn.Linear(4, 2), input_shape=(2, 4), seed=seed)
    with pytest.raises(UsageError, match="64 bits"):
        lr_find(nn.Linear(4, 2), (torch.randn(8, 4), torch.randn(8, 2)), steps=10, seed=seed)


def test_the_whole_64_bit_seed_range_is_accepted():
    assert validate_seed(2**64 - 1) == 2**64 - 1 and validate_seed(-(2**63)) == -(2**63)
    synthetic_batches(nn.Linear(4, 2), (2, 4), seed=2**64 - 1)


@pytest.mark.parametrize(("kwargs", "lr", "match"), [
    ({"momentum": -1.0}, 0.1, "--momentum"),
    ({"momentum": math.nan}, 0.1, "--momentum"),
    ({"weight_decay": -0.1}, 0.1, "--weight-decay"),
    ({"weight_decay": math.inf}, 0.1, "--weight-decay"),
    ({}, -1.0, "learning rate"),
    ({}, math.nan, "learning rate"),
    ({}, math.inf, "learning rate"),
    ({}, 0.0, "learning rate"),
])
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_arguments_torch_refuses_are_usage_errors(name, kwargs, lr, match):
    with pytest.raises(UsageError, match=match):
        optimizer_factory(name, **kwargs)([nn.Parameter(torch.ones(2))], lr)


def test_an_empty_parameter_list_is_a_usage_error():
    with pytest.raises(UsageError, match="empty parameter list"):
        optimizer_factory("adamw")([], 1e-3)
    with pytest.raises(UsageError, match="--lr"):
        validate_lr(-1.0)


def test_random_inputs_larger_than_memory_are_refused_before_allocating(monkeypatch):
    import nndiag.batches as batches

    def must_not_allocate(*args, **kwargs):
        raise AssertionError("allocated")

    monkeypatch.setattr(batches.torch, "randn", must_not_allocate)
    with pytest.raises(UsageError, match="more than this machine's"):
        synthetic_batches(nn.Linear(8, 2), (10**6, 10**6, 8))
    with pytest.raises(UsageError, match="more than this machine's"):
        synthetic_batches(nn.Embedding(10, 2), (10**7, 10**6), dtype="long")


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
                 "memory: you tried to allocate 1099511627776 bytes."),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
])
def test_an_allocation_failure_while_making_inputs_is_a_usage_error(monkeypatch, error):
    import nndiag.batches as batches

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(batches.torch, "randn", fail)
    with pytest.raises(UsageError, match="not enough memory"):
        synthetic_batches(nn.Linear(8, 2), (4, 8))


def test_other_runtime_errors_while_making_inputs_are_not_hidden(monkeypatch):
    import nndiag.batches as batches

    def fail(*args, **kwargs):
        raise RuntimeError("something else entirely")

    monkeypatch.setattr(batches.torch, "randn", fail)
    with pytest.raises(RuntimeError, match="something else"):
        synthetic_batches(nn.Linear(8, 2), (4, 8))


def test_numpy_and_tensor_numbers_are_accepted_where_python_numbers_are():
    import numpy as np

    from nndiag.errors import validate_positive

    assert validate_seed(np.int64(7)) == 7 and isinstance(validate_seed(np.uint64(2**64 - 1)), int)
    assert validate_positive(np.float32(1e-3), "--lr")
    assert validate_positive(torch.tensor(0.1), "--lr")
    optimizer_factory("sgd", momentum=np.float64(0.5))([nn.Parameter(torch.ones(1))],
                                                       np.float32(0.1))
    for bad in (True, "0.1", torch.ones(2)):
        with pytest.raises(UsageError):
            validate_positive(bad, "--lr")
