"""Figures are drawn two at a time (a forked process takes figures too): same bytes, same order, errors raised."""

import os
import sys
import time

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


@pytest.mark.skipif(not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2, reason="figures are drawn in one process")
def test_a_heavy_figure_does_not_hold_up_the_others(tmp_path):
    """Whichever process is free takes the next figure: while one draws a figure that waits for the last one,
    the other draws all the rest (each figure is stamped with whether this process drew it)."""
    parent, done = os.getpid(), tmp_path / "last figure drawn"

    def stamped(i, wait=False):
        def make():
            deadline = time.monotonic() + 60
            while wait and not done.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            if i == 5:
                done.touch()
            fig = _maker(i)()
            fig.suptitle(str(os.getpid() == parent))
            return fig
        return make

    makers = [stamped(0, wait=True)] + [stamped(i) for i in range(1, 6)]
    drawn = plots.render(makers)
    by_parent = [d == plots.png(make()) for d, make in zip(drawn, makers)]  # redrawn here: equal where the parent drew it
    assert by_parent[0] != by_parent[1] and len(set(by_parent[1:])) == 1


@pytest.mark.parametrize("bad", [0, 1])  # drawn here, or in the forked process
def test_a_figure_that_fails_is_an_error(bad):
    def broken():
        raise ValueError("no data for this figure")

    makers = [_maker(i) for i in range(3)]
    makers[bad] = broken
    with pytest.raises((ValueError, RuntimeError), match="no data for this figure"):
        plots.render(makers)
