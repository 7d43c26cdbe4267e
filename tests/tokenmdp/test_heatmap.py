"""Heatmaps: diverging colours centred at 0, self-contained HTML with the tokens, a figure."""

import io
import re

import numpy as np
import pytest
from matplotlib.figure import Figure

from prefopt_jax.tokenmdp import heatmap


def test_colours_diverge_around_zero_and_saturate():
    assert heatmap.value_to_rgb(0.0, 2.0) == (247, 247, 247)
    assert heatmap.value_to_rgb(2.0, 2.0) == (33, 102, 172)
    assert heatmap.value_to_rgb(-5.0, 2.0) == (178, 24, 43)
    assert heatmap.value_to_rgb(1.0, 2.0) == (140, 174, 210)  # halfway to blue, rounded
    red, _, blue = heatmap.value_to_rgb(-0.5, 1.0)
    assert red > blue


def test_html_holds_tokens_values_and_colours():
    tokens = ["The", " cat", "<b>", "\n"]
    page = heatmap.render_html(tokens, [0.5, -1.0, 0.0, 2.0], title="rewards & co")
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "http" not in page  # self-contained
    assert "rewards &amp; co" in page
    spans = re.findall(r'<span class="tok" style="background:rgb\((\d+),(\d+),(\d+)\);'
                       r'color:#\w+" title="([^"]+)">([^<]*)</span>', page)
    row = spans[:4]
    assert [s[4] for s in row] == ["The", "\u00b7cat", "&lt;b&gt;", "\u21b5"]
    assert [s[3] for s in row] == ["+0.5000", "-1.0000", "+0.0000", "+2.0000"]
    # Saturation at max |value| = 2: the +2 token is full blue, 0 is the neutral middle.
    assert tuple(map(int, row[3][:3])) == (33, 102, 172)
    assert tuple(map(int, row[2][:3])) == (247, 247, 247)
    assert "[+1.500]" in page  # the row total


def test_html_rows_labels_and_vmax():
    page = heatmap.render_html([["a", "b"], ["c"]], [np.array([1.0, -1.0]), [0.25]],
                               labels=["chosen", "rejected"], vmax=0.5)
    assert page.count('<div class="row">') == 3  # two sequences and the legend
    assert "chosen" in page and "rejected" in page
    assert 'background:rgb(33,102,172);color:#fff" title="+1.0000">a<' in page
    with pytest.raises(ValueError, match="2 tokens but 3 values"):
        heatmap.render_html(["a", "b"], [1.0, 2.0, 3.0])


def test_figure_cells_hold_values_and_tokens():
    fig = heatmap.plot_heatmap([["a", "b", "c"], ["d"]], [[1.0, -3.0, 0.0], [0.5]],
                               tokens_per_line=2, title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    image = ax.get_images()[0]
    grid = np.ma.filled(image.get_array(), np.nan)
    np.testing.assert_array_equal(grid[:, 0], [1.0, 0.0, 0.5])
    assert grid[0, 1] == -3.0 and np.isnan(grid[1, 1]) and np.isnan(grid[2, 1])
    assert image.get_clim() == (-3.0, 3.0)  # symmetric: 0 sits at the neutral colour
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c", "d"]
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    assert buffer.getvalue()[:4] == b"\x89PNG"


def test_masked_rows_keep_real_tokens():
    tokens, values = heatmap.masked_rows([[5, 6, 7], [8, 9, 0]], [[1, 2, 3], [4, 5, 6]],
                                         [[0, 1, 1], [1, 0, 0]], lambda i: f"<{i}>")
    assert tokens == [["<6>", "<7>"], ["<8>"]]
    np.testing.assert_array_equal(values[0], [2, 3])
    np.testing.assert_array_equal(values[1], [4])
