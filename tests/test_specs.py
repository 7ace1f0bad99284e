"""Spec loading and batch unpacking."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from nndiag.errors import UsageError, UserCodeError
from nndiag.losses import resolve_loss
from nndiag.specs import iter_batches, load_data, load_model, load_object, unpack_batch


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
