"""Bit-for-bit comparison of nested run states (checkpoints, outputs), for the resume and same-seed tests."""
import torch


def assert_same(a, b, where=""):
    """Tensors equal in dtype and every bit, dicts in keys and values, sequences item by item, the rest by ==;
    the message names the path to the first difference."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ: {sorted(set(a) ^ set(b), key=str)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
