"""Figures are drawn two at a time (a forked process draws every other one): same bytes, same order, errors raised."""

import matplotlib.pyplot as plt
import pytest

from eigenprune.reporting import plots


def _maker(i):
    def make():
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, i])
        ax.set_title(f"figure {i}")
        return fig
    return make


def test_render_keeps_the_bytes_and_the_order_of_drawing_one_by_one():
    makers = [_maker(i) for i in range(5)]
    assert plots.render(makers) == [plots.png(make()) for make in makers]


@pytest.mark.parametrize("bad", [0, 1])  # drawn here, or in the forked process
def test_a_figure_that_fails_is_an_error(bad):
    def broken():
        raise ValueError("no data for this figure")

    makers = [_maker(i) for i in range(3)]
    makers[bad] = broken
    with pytest.raises((ValueError, RuntimeError), match="no data for this figure"):
        plots.render(makers)
