"""Scale pairing and block grids: the one rule that load, inspect and convert share."""

import pytest

from pyloader.errors import PyloaderInputError
from pyloader.format.scales import SCALE_SUFFIXES, block_grid, find_scale, scale_block, scale_names, weight_of_scale
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


@pytest.mark.parametrize("shape,scale,want", [
    ((300, 257), (3, 3), (128, 128)),      # the declared grid, ragged edges
    ((40, 64), (1,), (40, 64)),            # per-tensor
    ((40, 64), (1, 1), (40, 64)),
    ((64, 96), (64,), (1, 96)),            # per-channel
    ((64, 96), (64, 1), (1, 96)),
    ((1000,), (8,), (128, 128)),           # a 1-D weight is one row
])
def test_scale_block_reads_the_declared_grid_per_tensor_and_per_channel(shape, scale, want):
    assert scale_block(shape, scale, (128, 128), "w") == want


@pytest.mark.parametrize("shape,scale", [
    ((384, 1000), (6, 4)),     # fits 64x256 blocks, but 128x128 is declared: never guessed
    ((256, 128), (3, 7)),      # fits nothing
    ((64, 96), (96,)),         # one value a column is not a layout any release ships
])
def test_a_scale_that_contradicts_the_declared_blocks_is_an_error_naming_it(shape, scale):
    with pytest.raises(PyloaderInputError, match=r"w\.weight_scale_inv: scale shape .* declared 128x128 blocks"):
        scale_block(shape, scale, (128, 128), "w.weight_scale_inv")


def test_weight_of_scale_inverts_scale_names():
    for name in scale_names("model.layers.0.o.weight"):
        assert weight_of_scale(name) == "model.layers.0.o.weight"
    assert weight_of_scale("model.layers.0.o.weight") is None
    assert weight_of_scale("model.layers.0.o.input_scale") is None
