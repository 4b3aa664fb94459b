"""Grad-CAM cells are drawn where they look: at the centres of their receptive fields."""

import numpy as np
import pytest
import torch
from torch import nn

from breastfusion.explain.gradcam import CellCentres, receptive_field_centres, upsample
from breastfusion.models.efficientnet_lite import SameConv2d


def _support_centre(net: nn.Module, size: int, cell: tuple[int, int]) -> tuple[float, float]:
    """Centre of the input pixels that one output cell depends on (a linear network with random
    weights: every pixel of the receptive field has a non-zero gradient; average pools stand
    in for max pools, whose gradient reaches one pixel per window)."""
    x = torch.rand(1, 1, size, size, dtype=torch.float64, requires_grad=True)
    out = net(x)
    (grad,) = torch.autograd.grad(out[0, :, cell[0], cell[1]].sum(), x)
    rows, cols = np.nonzero(grad[0, 0].numpy())
    return (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2


NETS = {
    "tensorflow same": lambda: nn.Sequential(SameConv2d(1, 2, 3, stride=2), SameConv2d(2, 2, 5, stride=2),
                                             SameConv2d(2, 2, 3, stride=1), SameConv2d(2, 2, 3, stride=2)),
    "symmetric": lambda: nn.Sequential(nn.Conv2d(1, 2, 7, stride=2, padding=3), nn.AvgPool2d(3, 2, padding=1),
                                       nn.Conv2d(2, 2, 3, stride=2, padding=1)),
    "unpadded pools": lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(3, 2, ceil_mode=True),
                                            nn.Conv2d(2, 2, 1), nn.AvgPool2d(2, 2, ceil_mode=True)),
}


@pytest.mark.parametrize("size", [64, 61])
@pytest.mark.parametrize("name", list(NETS))
def test_centres_are_the_receptive_fields_centres(name, size):
    torch.manual_seed(0)
    net = NETS[name]().double()
    layer = net[-1]
    centres = receptive_field_centres(net, layer, (size, size))
    n = len(centres.rows)
    for cell in [(n // 2, n // 2), (n // 2 - 1, n // 2 + 1)]:  # inner cells: fields not cut by the border
        expected = _support_centre(net, size, cell)
        assert (centres.rows[cell[0]], centres.cols[cell[1]]) == pytest.approx(expected), (name, size, cell)


def test_efficientnet_cells_look_below_and_right_of_a_plain_resize():
    from breastfusion.config import BackboneConfig
    from breastfusion.models.backbones import build_backbone

    bb = build_backbone(BackboneConfig(name="efficientnet_lite0", weights="none", image_size=224))
    centres = receptive_field_centres(bb, bb.cam_layer, (224, 224))
    assert np.allclose(centres.rows, 32 * np.arange(7) + 31) and np.allclose(centres.cols, centres.rows)


def test_upsampled_map_peaks_at_the_cell_centre():
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0
    centres = CellCentres(np.array([5.0, 21.0, 37.0, 53.0]), np.array([3.0, 19.0, 35.0, 51.0]), (64, 60))
    heat = upsample(grid, centres)
    assert heat.shape == (64, 60) and heat.max() == pytest.approx(1.0)
    assert np.unravel_index(heat.argmax(), heat.shape) == (21, 35)
    assert heat[21, 27] == pytest.approx(0.5)  # halfway to the next column centre
    assert heat[:, 52:].max() == 0  # beyond the last column's centre: that column's values (zero)
