import itertools

import pytest

from methods.budgets import pyramid_selected, uniform_selected


def test_paper_values_llama3_8b_shape():
    sel = pyramid_selected(32, 128, 8, 8000)
    assert sel[0] == 234 and sel[31] == 17
    assert sum(sel) / 32 == 125.5
    assert sel == [234 - 7 * i for i in range(32)]


def test_paper_rule_80_layers_overshoots_the_mean():
    sel = pyramid_selected(80, 128, 8, 8000)
    assert (sel[0], sel[-1]) == (234, 76)
    assert sum(sel) / 80 == pytest.approx(155.0)  # +29% over C - w = 120, the paper rule's floored step


@pytest.mark.parametrize("schedule", ["paper", "mean"])
def test_regimes(schedule):
    c, w, n = 128, 8, 32
    assert pyramid_selected(n, c, w, 127, schedule=schedule) is None  # q < C: no compression
    assert pyramid_selected(n, c, w, 128, schedule=schedule) == [120] * n  # C <= q < 2(C - w): uniform
    assert pyramid_selected(n, c, w, 239, schedule=schedule) == [120] * n
    pyramid = pyramid_selected(n, c, w, 240, schedule=schedule)
    assert pyramid[0] > pyramid[-1]


def test_clamped_max_at_short_prompts():
    # q = 240: max_sel = 234 >= q - w = 232 -> max_sel = 232, min_sel = 240 - 232 = 8, step = 224 // 31 = 7
    sel = pyramid_selected(32, 128, 8, 240)
    assert sel[0] == 232 and sel[31] == 232 - 31 * 7


def test_uniform():
    assert uniform_selected(4, 64, 8, 63) is None
    assert uniform_selected(4, 64, 8, 64) == [56] * 4


def test_single_layer():
    assert pyramid_selected(1, 64, 8, 1000) == [56]


CASES = list(
    itertools.product([1, 2, 3, 7, 32, 80], [16, 64, 128, 512, 2048], [1, 4, 8, 32], [20, 100, 300, 1000, 8000, 32000])
)


@pytest.mark.parametrize("layers,c,w,q", [x for x in CASES if x[1] > x[2]])
def test_properties(layers, c, w, q):
    for schedule in ("paper", "mean"):
        sel = pyramid_selected(layers, c, w, q, schedule=schedule)
        if q < c:
            assert sel is None
            continue
        assert len(sel) == layers
        assert all(0 <= s <= q - w for s in sel), sel
        assert all(a >= b for a, b in zip(sel, sel[1:], strict=False)), "budgets must not grow with depth"
        if schedule == "mean":
            assert sum(sel) == layers * (c - w)
        else:
            assert sum(sel) >= layers * (c - w)  # the floored step can only raise the mean
