"""Tests for qlib.reconstruct.brecq (block-wise reconstruction).

Reference: Li et al., ICLR 2021 (BRECQ): the rounding of all layers in a block is learned
jointly against the block's float output (here plain MSE, no Fisher weighting), residual blocks
being the unit, and activation step sizes optionally learned with LSQ (Esser et al. 2020). Checked:
the blocks found for the zoo's models; on fresh inputs the reconstructed block's output error is
below round-to-nearest's; weights end exactly on their frozen grids and learned step sizes are
written into the frozen activation scales; the result evaluates as an ordinary converted model.
"""

import pytest
import torch

from qlib import data, models
from qlib.modules import QuantConfig, swap_modules
from qlib.ptq import quantize_static
from qlib.reconstruct import brecq, capture, find_blocks, float_reference

W3A3 = QuantConfig(weight_bits=3, act_bits=3, weight_observer="mse", act_observer="percentile",
                   act_observer_kwargs={"percentile": 99.9})


@pytest.fixture(scope="module")
def res16():
    digits = data.load_digits(16)
    calib = digits.train.tensors[0][:96]
    q = quantize_static(models.pretrained("res16", 0), calib.split(48), W3A3)
    return digits, q, calib, digits.val.tensors[0][:96]


def test_blocks_of_the_zoo_models():
    assert find_blocks(swap_modules(models.create("cnn16"))) == [["0", "1", "2"], ["3", "4", "5", "6"],
                                                                ["7", "8", "9", "10", "11"], ["12"]]
    assert find_blocks(swap_modules(models.create("res16"))) == [["0", "1", "2"], ["3"], ["4"], ["5", "6", "7"], ["8"]]


def test_block_beats_round_to_nearest_on_fresh_data_and_lands_on_grid(res16):
    digits, q, calib, fresh = res16
    fp = float_reference(q)
    qb, stats = brecq(q, calib, blocks=[["4"]], iters=120, seed=0, return_stats=True)
    err = {name: (capture(m, "4", fresh, "output") - capture(fp, "4", fresh, "output")).pow(2).mean().item()
           for name, m in (("rtn", q), ("brecq", qb))}
    assert err["brecq"] < 0.9 * err["rtn"], err
    assert stats["4"]["layers"] == ["4.conv1", "4.conv2", "4.shortcut.0"]
    for name in stats["4"]["layers"]:
        layer = qb.get_submodule(name)
        assert torch.equal(layer.weight_fq(layer.weight), layer.weight), name
        assert torch.equal(layer.weight_fq.frozen_scale, q.get_submodule(name).weight_fq.frozen_scale)
    # the learned activation step sizes were written back (and the input model kept its own)
    moved = [not torch.equal(qb.get_submodule(n).input_fq.frozen_scale, q.get_submodule(n).input_fq.frozen_scale)
             for n in stats["4"]["layers"]]
    assert any(moved)
    assert torch.equal(qb.get_submodule("3.conv1").weight, q.get_submodule("3.conv1").weight)  # other blocks kept


def test_without_learned_step_sizes_the_activation_grid_stays(res16):
    _, q, calib, _ = res16
    qb = brecq(q, calib, blocks=[["8"]], iters=5, learn_act_scale=False, seed=0)
    assert torch.equal(qb.get_submodule("8").input_fq.frozen_scale, q.get_submodule("8").input_fq.frozen_scale)


def test_bad_blocks(res16):
    _, q, calib, _ = res16
    with pytest.raises(AttributeError):
        brecq(q, calib, blocks=[["nope"]], iters=1)
    with pytest.raises(ValueError, match="not a chain"):
        brecq(q, calib, blocks=[["3", "5"]], iters=1)  # block 4 is skipped: not what the model runs
    with pytest.raises(ValueError, match="blocks"):
        brecq(q, calib, blocks=[], iters=1)
