"""Which layers `max_gpu_memory` makes resident: spread over the stack for training, bottom-up for inference."""
from __future__ import annotations

import pytest

from kllama.model.engine_setup import spread_layers


def test_spread_picks_the_layer_farthest_from_resident_ones_and_the_ends():
    # 26 layers, none resident: the middle first (12 and 13 are 13 layers from an end; ties go to the lower), then
    # the middles of the two halves
    assert spread_layers(3, list(range(26)), [], 26) == [12, 19, 5]
    # the seed YAML at load: 6 of 26 spread, no two adjacent and neither end
    assert sorted(spread_layers(6, list(range(26)), [], 26)) == [2, 5, 8, 12, 15, 19]


def test_spread_fills_the_largest_gaps_left_by_layers_already_resident():
    # layers 0..5 resident (the old bottom-up promotion): the next ones go to the middle of 6..25
    assert spread_layers(2, list(range(6, 26)), list(range(6)), 26) == [15, 10]
    assert spread_layers(1, [7, 8], [], 10) == [7]  # only candidates are picked; ties go to the lower layer
    assert spread_layers(5, [1, 2], [], 4) == [1, 2]  # never more than the candidates


@pytest.mark.parametrize("count", [0, 1, 4, 8, 16])
def test_spread_picks_each_layer_once_and_the_ends_last(count):
    picked = spread_layers(count, list(range(16)), [], 16)
    assert len(picked) == len(set(picked)) == count
    if count <= 8:  # the first and the top layer start a pass: they stay streamed while others can take the room
        assert 15 not in picked, picked
