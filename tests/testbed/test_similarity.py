import numpy as np
import pytest
import torch

from memfree.similarity import PixelIndex
from memfree.images import from_uint8
from memfree_testbed.render import render, style_of


def test_training_images_are_their_own_neighbours(testbed_data):
    _, images, _ = testbed_data
    index = PixelIndex(images)
    ids = [0, 5, 2400, 2425, 2500]
    nn = index.search(from_uint8(images[ids]))
    assert nn.ids.tolist() == ids
    assert torch.all(nn.nl2 < 1e-4) and torch.all(nn.memorized)


def test_obeying_a_prompt_is_not_memorization(testbed_data):
    """Fresh renders of held-out or seen-once prompts (perfect obedience, new detail) are rarely flagged."""
    _, images, m = testbed_data
    index = PixelIndex(images)
    rng = np.random.default_rng(5)
    style = style_of(m)
    held = [render(a, rng, m["size"], style) for a in m["heldout_compositions"]]
    once = [render(e["attrs"], rng, m["size"], style) for e in m["eval"]["seen_once"]]
    assert index.search(from_uint8(np.stack(held))).memorized.float().mean() <= 0.03
    assert index.search(from_uint8(np.stack(once))).memorized.float().mean() <= 0.05


def test_shape_mismatch_is_an_error(testbed_data):
    _, images, _ = testbed_data
    with pytest.raises(ValueError, match="do not match"):
        PixelIndex(images).search(torch.zeros(1, 3, 16, 16))
