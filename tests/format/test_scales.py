"""Scale pairing and block grids: the one rule that load, inspect and convert share."""

import pytest

from pyloader.errors import PyloaderInputError
from pyloader.format.scales import SCALE_SUFFIXES, block_grid, find_scale, infer_block, scale_names
from pyloader.routing.router import Router, Rules


def test_the_router_pairs_exactly_the_names_convert_looks_for():
    """Every candidate name convert tries for a weight routes, in the router, as that weight's scale."""
    router = Router(Rules(), ["model.layers.0.mlp.up_proj.weight"])
    for name in scale_names("model.layers.0.mlp.up_proj.weight"):
        route = router.route(name)
        assert (route.kind, route.target) == ("scale", "model.layers.0.mlp.up_proj.weight"), name
    assert len(scale_names("x.weight")) == len(SCALE_SUFFIXES)


def test_find_scale_takes_the_first_candidate_present():
    names = {"a.weight", "a.weight_scale", "a.weight_scale_inv", "b.weight", "b.scale_inv"}
    assert find_scale("a.weight", names) == "a.weight_scale_inv"
    assert find_scale("b.weight", names) == "b.scale_inv"
    assert find_scale("c.weight", names) is None


def test_block_grid_is_the_ceiling_of_each_dimension():
    assert block_grid((300, 257), (128, 128)) == (3, 3)
    assert block_grid((4, 300, 257), (128, 128)) == (4, 3, 3)
    assert block_grid((257,), (128, 128)) == (3,)


@pytest.mark.parametrize("shape,scale,preferred,want", [
    ((300, 257), (3, 3), (128, 128), (128, 128)),
    ((40, 64), (1,), (128, 128), (40, 64)),       # per-tensor
    ((64, 96), (64,), (128, 128), (1, 128)),      # per-channel, 1-D: one block spans the row
    ((64, 96), (64, 3), (128, 128), (1, 32)),     # 1x32 (MX)
])
def test_infer_block_prefers_the_declared_block(shape, scale, preferred, want):
    assert infer_block(shape, scale, preferred, "w") == want


def test_infer_block_refuses_a_grid_no_block_fits():
    with pytest.raises(PyloaderInputError, match="w: scale shape \\[3, 7\\] matches no block shape"):
        infer_block((256, 128), (3, 7), (128, 128), "w")
