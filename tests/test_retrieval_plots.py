"""The report figures are written as valid PNGs and reject malformed input."""

import numpy as np
import pytest

from brcd.plots import plot_map_vs_bits, plot_mask_heatmap, plot_pr_curves

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png(tmp_path):
    p1 = plot_pr_curves({"t": ([np.nan, 1.0, 0.5], [0.0, 0.3, 1.0]), "s": ([1, 1, 1], [0, .5, 1])},
                        tmp_path / "pr.png")
    p2 = plot_map_vs_bits({"BRCD": {16: 0.6, 32: (0.65, 0.01), 64: 0.7}}, tmp_path / "m.png")
    p3 = plot_mask_heatmap(np.random.default_rng(0).random((4, 32)) > 0.5, tmp_path / "h.png")
    for p in (p1, p2, p3):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 1000


def test_plots_bad_input(tmp_path):
    with pytest.raises(ValueError, match="curves"):
        plot_pr_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same length"):
        plot_pr_curves({"a": ([1, 2], [1])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="mask"):
        plot_mask_heatmap(np.zeros(5), tmp_path / "x.png")
