"""Packed group records (common/records.py): one array per wire dtype, exact round trips in every
transport dtype, a layout that does not depend on key order, and clear refusals of another layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.model import build_model, model_preset, split_groups
from common.records import TRANSPORT_DTYPES, from_arrayrecord, to_arrayrecord, unpack


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"g.b": torch.randn(3), "g.a": torch.randn(2, 4), "g.steps": torch.tensor([7, 9], dtype=torch.int64),
            "g.c": torch.randn(1, 1, 5)}


@pytest.mark.parametrize("transport", sorted(TRANSPORT_DTYPES))
def test_a_group_travels_as_one_array_per_wire_dtype_and_comes_back_exactly(transport: str) -> None:
    state = _state()
    record = to_arrayrecord(state, transport)
    wire = {"float32": "float32", "float16": "float16", "bfloat16": "int16"}[transport]
    assert sorted(record.keys()) == sorted([f"packed:{wire}", "packed:int64"])
    assert tuple(record[f"packed:{wire}"].shape) == (3 + 8 + 5,)
    back = from_arrayrecord(record, state, transport)
    assert list(back) == list(state)
    for key, value in state.items():
        want = value.to(TRANSPORT_DTYPES[transport]).to(value.dtype) if value.is_floating_point() else value
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        torch.testing.assert_close(back[key], want, rtol=0, atol=0, msg=key)


def test_the_layout_is_the_sorted_keys_whatever_order_either_side_holds_them_in() -> None:
    state = _state()
    reversed_state = dict(reversed(list(state.items())))
    record = to_arrayrecord(reversed_state)
    np.testing.assert_array_equal(record["packed:float32"].numpy(), to_arrayrecord(state)["packed:float32"].numpy())
    views = unpack(record, state, "float32")
    assert list(views) == list(state)  # the receiver's own order
    np.testing.assert_array_equal(views["g.a"], state["g.a"].numpy())
    assert not views["g.a"].flags.writeable  # a view of the payload, not a copy


def test_another_layout_is_refused_by_name() -> None:
    state = _state()
    record = to_arrayrecord(state)
    with pytest.raises(ValueError, match=r"group 'g': packed arrays differ: missing \['packed:int64'\], unexpected"):
        unpack(ArrayRecord({"packed:float32": record["packed:float32"]}), state, "float32", "group 'g'")
    with pytest.raises(ValueError, match=r"unexpected \['g.a'\]"):
        unpack(ArrayRecord({**{k: record[k] for k in record.keys()}, "g.a": Array(np.zeros(8, np.float32))}),
               state, "float32")
    shorter = {**state, "g.c": torch.randn(1, 1, 4)}  # the sender's model has one value fewer
    with pytest.raises(ValueError, match=r"holds float32 \(15,\), expected float32 \(16,\)"):
        unpack(to_arrayrecord(shorter), state, "float32")


def test_the_tiny_models_groups_each_travel_as_one_array() -> None:
    """What packing is for: Flower moves every array of a message as separate requests."""
    groups = split_groups(build_model(model_preset("tiny"), 5, seed=0).state_dict())
    assert sum(len(g) for g in groups.values()) > 80  # one array per tensor would be this many
    for group, state in groups.items():
        record = to_arrayrecord(state, "float32")
        assert list(record.keys()) == ["packed:float32"], group
        back = from_arrayrecord(record, state, "float32")
        assert all(torch.equal(back[k], v) for k, v in state.items()), group
