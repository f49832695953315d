"""M-RoPE position index vs transformers' Qwen2.5-VL `get_rope_index`."""

from __future__ import annotations

import types

import numpy as np
import pytest

from finers_rt.errors import InputError
from finers_rt.mrope import compute_rope_index, sequential_positions

IMAGE, START, END = 151655, 151652, 151653


def _sequence(rng, grid, before, after):
    num_image_tokens = grid[0] * grid[1] * grid[2] // 4
    return np.concatenate([rng.integers(0, 1000, before), [START], [IMAGE] * num_image_tokens, [END],
                           rng.integers(0, 1000, after)]).astype(np.int64)


@pytest.mark.parametrize("grid,before,after", [
    ((1, 4, 6), 5, 7), ((1, 78, 138), 14, 120), ((1, 36, 36), 0, 3), ((1, 2, 2), 1, 1),
    ((2, 4, 4), 3, 0), ((1, 8, 2), 20, 40)])
def test_positions_and_delta_equal_hf(grid, before, after):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig()
    assert (config.image_token_id, config.vision_start_token_id) == (IMAGE, START)
    ids = _sequence(np.random.default_rng(sum(grid) + before), grid, before, after)
    reference, delta = Qwen2_5_VLModel.get_rope_index(types.SimpleNamespace(config=config),
                                                      torch.tensor(ids)[None], torch.tensor([grid]))
    positions, rope_delta = compute_rope_index(ids, [grid], image_token_id=IMAGE,
                                               vision_start_token_id=START, spatial_merge_size=2)
    assert positions.dtype == np.int64
    assert np.array_equal(positions, reference[:, 0].numpy())
    assert rope_delta == int(delta)


def test_two_images_and_text_only():
    rng = np.random.default_rng(3)
    ids = np.concatenate([_sequence(rng, (1, 4, 4), 2, 3), _sequence(rng, (1, 2, 6), 1, 2)])
    positions, delta = compute_rope_index(ids, [(1, 4, 4), (1, 2, 6)], image_token_id=IMAGE,
                                          vision_start_token_id=START, spatial_merge_size=2)
    # second image starts after: 2 text + start, 4 image (max 1), end + 3 text + 1 text + start
    assert positions[:, 3 + 4].tolist() == [5, 5, 5]  # <|vision_end|> after a 2x2 merged grid at 3
    assert delta == int(positions.max()) + 1 - ids.size
    text = np.arange(9, dtype=np.int64)
    positions, delta = compute_rope_index(text, [], image_token_id=IMAGE, vision_start_token_id=START,
                                          spatial_merge_size=2)
    assert np.array_equal(positions, np.stack([text] * 3)) and delta == 0


def test_decode_positions_continue_after_prompt():
    ids = _sequence(np.random.default_rng(0), (1, 6, 8), 4, 5)
    full, delta = compute_rope_index(ids, [(1, 6, 8)], image_token_id=IMAGE, vision_start_token_id=START,
                                     spatial_merge_size=2)
    # prompt = prefix (through <|vision_end|>) + question: question positions = index + delta
    prefix_len = 4 + 1 + 12 + 1
    _, prefix_delta = compute_rope_index(ids[:prefix_len], [(1, 6, 8)], image_token_id=IMAGE,
                                         vision_start_token_id=START, spatial_merge_size=2)
    assert prefix_delta == delta
    question = sequential_positions(prefix_len, ids.size - prefix_len, prefix_delta)
    assert np.array_equal(question[:, 0], full[:, prefix_len:])
    step = sequential_positions(ids.size + 2, 1, delta, batch=3)
    assert step.shape == (3, 3, 1) and int(step[0, 0, 0]) == int(full.max()) + 3


def test_mismatched_grid_is_an_input_error():
    ids = _sequence(np.random.default_rng(1), (1, 4, 4), 2, 2)
    with pytest.raises(InputError, match="1 image"):
        compute_rope_index(ids, [], image_token_id=IMAGE, vision_start_token_id=START, spatial_merge_size=2)
    with pytest.raises(InputError, match="do not match"):
        compute_rope_index(ids[:-4], [(1, 8, 8)], image_token_id=IMAGE, vision_start_token_id=START,
                           spatial_merge_size=2)
    with pytest.raises(InputError, match="1-D integer"):
        compute_rope_index(ids.astype(np.float32), [(1, 4, 4)], image_token_id=IMAGE,
                           vision_start_token_id=START, spatial_merge_size=2)
