"""The map statistics of attnlib.analysis, on maps whose answers are known by hand."""
from __future__ import annotations

import math

import pytest
import torch

from attnlib import NonLocal2d, analysis


def uniform(q: int, h: int, w: int) -> torch.Tensor:
    return torch.full((q, h, w), 1.0 / (h * w))


def one_hot(h: int, w: int, cells) -> torch.Tensor:
    maps = torch.zeros(len(cells), h, w)
    for k, (i, j) in enumerate(cells):
        maps[k, i, j] = 1.0
    return maps


def test_query_similarity_is_one_for_identical_maps_and_zero_for_disjoint_ones():
    torch.manual_seed(0)
    same = torch.rand(1, 6, 8).softmax(dim=-1).expand(4, 6, 8)
    assert analysis.query_similarity(same) == pytest.approx(1.0)
    assert analysis.query_similarity(one_hot(6, 8, [(0, 0), (3, 4), (5, 7)])) == pytest.approx(0.0)


def test_query_similarity_averages_over_distinct_pairs_only():
    maps = one_hot(2, 2, [(0, 0), (0, 0), (1, 1)])  # pairs: (0,1) = 1, (0,2) = 0, (1,2) = 0
    assert analysis.query_similarity(maps) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2 queries"):
        analysis.query_similarity(maps[:1])


def test_relative_entropy_is_one_for_uniform_and_zero_for_one_cell():
    assert torch.allclose(analysis.relative_entropy(uniform(2, 5, 7)), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(analysis.relative_entropy(one_hot(5, 7, [(2, 3)])), torch.zeros(1, dtype=torch.float64))
    half = torch.zeros(1, 4, 4)
    half[0, 0, :2] = 0.5  # two cells of sixteen: log 2 / log 16 = 1/4
    assert analysis.relative_entropy(half).item() == pytest.approx(0.25)


def test_border_mass_against_the_band_share():
    mass, share = analysis.border_mass(uniform(1, 10, 10), width=1)
    assert share == pytest.approx(36 / 100)
    assert mass.item() == pytest.approx(0.36)
    mass, _ = analysis.border_mass(one_hot(10, 10, [(0, 5), (5, 5)]), width=1)
    assert mass.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="expected 1 <= width"):
        analysis.border_mass(uniform(1, 4, 4), width=2)


def test_same_class_ratio_is_one_without_preference_and_inverse_share_when_all_on_class():
    labels = torch.zeros(4, 5, dtype=torch.long)
    labels[:, :1] = 1  # class 1 covers 4 of 20 cells
    queries = [(2, 0), (2, 3)]
    assert torch.allclose(analysis.same_class_ratio(uniform(2, 4, 5), labels, queries),
                          torch.ones(2, dtype=torch.float64))
    on_class = one_hot(4, 5, [(0, 0), (1, 4)])
    assert analysis.same_class_ratio(on_class, labels, queries).tolist() == pytest.approx([5.0, 20 / 16])
    with pytest.raises(ValueError, match="expected 2 queries"):
        analysis.same_class_ratio(on_class, labels, queries[:1])
    with pytest.raises(ValueError, match="cell labels of shape"):
        analysis.same_class_ratio(on_class, labels[:3], queries)


def test_distance_matched_keeps_ring_totals_and_flattens_within_rings():
    torch.manual_seed(0)
    maps = torch.rand(1, 7, 9).softmax(dim=-1)
    query = (3, 4)
    matched = analysis.distance_matched(maps, [query])
    rows, cols = torch.meshgrid(torch.arange(7.0), torch.arange(9.0), indexing="ij")
    ring = torch.hypot(rows - 3, cols - 4).round()
    normalised = maps / maps.sum()
    for r in ring.unique():
        cells = ring == r
        assert matched[0][cells].sum().item() == pytest.approx(normalised[0][cells].sum().item())
        assert torch.allclose(matched[0][cells], matched[0][cells].mean().expand(int(cells.sum())))


def test_mean_map_is_query_independent():
    torch.manual_seed(0)
    maps = torch.rand(3, 4, 4)
    mean = analysis.mean_map(maps)
    assert analysis.query_similarity(mean) == pytest.approx(1.0)
    assert torch.allclose(mean.sum(dim=(1, 2)), torch.ones(3, dtype=torch.float64))


def test_map_statistics_bundles_every_statistic_and_checks_the_untrained_shape():
    labels = torch.zeros(6, 8, dtype=torch.long)
    labels[3:] = 2
    queries = [(1, 2), (4, 5)]
    maps = one_hot(6, 8, [(1, 3), (5, 5)])
    stats = analysis.map_statistics(maps, labels, queries, untrained=uniform(2, 6, 8))
    assert stats["similarity"] == pytest.approx(0.0)
    assert stats["same_class"].tolist() == pytest.approx([2.0, 2.0])
    assert stats["same_class_untrained"].tolist() == pytest.approx([1.0, 1.0])
    assert stats["border_mass"].tolist() == [0.0, 1.0]
    assert set(stats) >= {"entropy", "border_share", "same_class_mean_map", "same_class_distance"}
    with pytest.raises(ValueError, match="untrained maps of shape"):
        analysis.map_statistics(maps, labels, queries, untrained=uniform(3, 6, 8))


@pytest.mark.parametrize("bad", [torch.zeros(4, 4), -torch.ones(1, 2, 2), torch.full((1, 2, 2), math.nan)])
def test_bad_maps_are_refused(bad):
    with pytest.raises(ValueError, match="relative_entropy"):
        analysis.relative_entropy(bad)


def test_interior_queries_stay_off_edges_and_the_border():
    labels = torch.zeros(12, 16, dtype=torch.long)  # class 0 everywhere, touching the border
    labels[0:3, :] = 1                              # a band along the top border: no interior cell
    labels[5:10, 6:13] = 2                          # a 5×7 block: its centre is (7, 9)
    picks = dict(analysis.interior_queries(labels, [0, 1, 2], margin=2, min_depth=2))
    assert 1 not in picks
    assert picks[2] == (7, 9)
    i, j = picks[0]
    assert 2 <= i < 10 and 2 <= j < 14 and labels[i, j] == 0
    assert analysis.border_cells(12, 16, 2)[i, j].item() is False


def test_interior_queries_break_ties_toward_the_centroid_not_the_top_left():
    labels = torch.ones(10, 20, dtype=torch.long)  # one class everywhere: many cells equally deep
    (_, (i, j)), = analysis.interior_queries(labels, [1], margin=2)
    assert (i, j) in {(4, 9), (4, 10), (5, 9), (5, 10)}


def test_reinitialised_draws_new_weights_and_leaves_the_block_and_global_rng_alone():
    torch.manual_seed(0)
    block = NonLocal2d(8, 4).train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    state = torch.random.get_rng_state()
    fresh = analysis.reinitialised(block, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, block.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(fresh.theta.weight, block.theta.weight)
    assert not fresh.training and block.training
    again = analysis.reinitialised(block, seed=1)
    assert torch.equal(again.theta.weight, fresh.theta.weight)
