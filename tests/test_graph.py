"""Node vocabulary and route counting on the layer x position grid."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interp.arch import Arch
from interp.graph import GridPoint, Node, Site, count_routes, node_from_hook_name, routes


def test_node_hook_names_exist_in_model(any_model):
    arch = Arch.of(any_model)
    for site in Site:
        if site in (Site.Q_INPUT, Site.K_INPUT, Site.V_INPUT):
            continue
        node = Node(arch.n_layers - 1, site)
        assert node.hook_name in any_model.hook_dict, node
        assert node_from_hook_name(node.hook_name) == node


def test_node_validation_errors(llama_model):
    arch = Arch.of(llama_model)
    with pytest.raises(ValueError, match=r"layer expected in \[0, 3\), got 3"):
        Node(3, "resid_pre").validate(arch)
    with pytest.raises(ValueError, match=r"KV group expected in \[0, 2\), got 2.*n_key_value_heads=2"):
        Node(0, "k", head=2).validate(arch)
    Node(0, "q", head=3).validate(arch)  # 4 query heads
    with pytest.raises(ValueError, match="has no heads"):
        Node(0, "resid_pre", head=1)
    with pytest.raises(ValueError, match="did you mean"):
        Node(0, "resid_psot")
    with pytest.raises(ValueError, match=r"position expected in \[0, 5\)"):
        Node(0, "resid_pre", pos=5).validate(arch, seq_len=5)


@given(st.integers(0, 4), st.integers(0, 5))
def test_lattice_count_is_binomial_and_enumeration_matches(n, m):
    a, b = GridPoint(1, 2), GridPoint(1 + n, 2 + m)
    rs = list(routes(a, b, "lattice"))
    assert len(rs) == count_routes(a, b, "lattice") == math.comb(m + n, n)
    assert len({r.signature for r in rs}) == len(rs)
    for r in rs:
        assert r.signature.count("U") == n and r.signature.count("R") == m


@given(st.integers(1, 4), st.integers(0, 5))
def test_physical_routes_one_read_per_layer(n, m):
    a, b = GridPoint(0, 0), GridPoint(n, m)
    rs = list(routes(a, b, "physical"))
    assert len(rs) == count_routes(a, b, "physical") == math.comb(m + n - 1, n - 1)
    for r in rs:
        assert [s.layer for s in r.steps] == list(range(n))  # exactly one step per layer
        assert sum(s.dst_pos - s.src_pos for s in r.steps) == m


def test_design_example_three_routes():
    # DESIGN.md: A = (layer i-1, pos j-2) to B = (layer i, pos j): C(3, 1) = 3 lattice routes
    rs = {r.signature for r in routes(GridPoint(0, 3), GridPoint(1, 5))}
    assert rs == {"URR", "RUR", "RRU"}
    # physically, one attention read per layer: the only route is one jump of 2 at layer 0
    (phys,) = routes(GridPoint(0, 3), GridPoint(1, 5), "physical")
    assert phys.kv_layers == (0,) and phys.steps[0].src_pos == 3 and phys.steps[0].dst_pos == 5


def test_routes_reject_backwards():
    with pytest.raises(ValueError, match="expected dst at or above"):
        count_routes(GridPoint(2, 3), GridPoint(1, 5))
