"""Static figures (matplotlib): the numbers drawn are the audit's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lensattr.auditing.demo import synthetic_audit

pytest.importorskip("matplotlib", reason="figures need matplotlib (pip install 'lensattr[plot]')")
from matplotlib.colors import to_rgb  # noqa: E402

from lensattr.report.figures import write_figures  # noqa: E402
from lensattr.report.grid import VERDICT_COLOURS  # noqa: E402


@pytest.fixture(scope="module")
def audit():
    return synthetic_audit(3, 4, 6, seed=1)


def test_verdict_grid_colours_each_head(audit):
    fig = audit.plot("grid")
    img = fig.axes[0].images[0].get_array()
    assert img.shape == (3, 4, 3)
    for r in audit.heads.itertuples():
        assert np.allclose(img[r.layer, r.head], to_rgb(VERDICT_COLOURS[r.verdict]))


def test_heatmap_holds_the_column(audit):
    fig = audit.plot("heatmap", column="ablation_zero")
    m = np.asarray(fig.axes[0].images[0].get_array())
    h = audit.heads
    assert np.allclose(m[h["layer"], h["head"]], h["ablation_zero"])
    with pytest.raises(ValueError, match="column: 'nope'"):
        audit.plot("heatmap", column="nope")


def test_scatter_points_and_intervals(audit):
    fig = audit.plot("scatter", heads=[(0, 1), (2, 3)])
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()][:2] == ["L0H1", "L2H3"]
    e = audit.edges[(audit.edges["layer"] == 2) & (audit.edges["head"] == 3)]
    line = fig.axes[1].lines[0]  # the error bar's data points
    assert np.allclose(line.get_xdata(), e["attention"]) and np.allclose(line.get_ydata(),
                                                                           e["effect_remove"])
    segs = fig.axes[1].collections[0].get_segments()  # one vertical CI segment per point
    assert np.allclose([s[0][1] for s in segs], e["effect_remove_lo"])
    assert np.allclose([s[1][1] for s in segs], e["effect_remove_hi"])


def test_token_and_position_maps(audit):
    toks = audit.meta["example_text_tokens"]
    m = torch.rand(len(toks), len(toks))
    fig = audit.plot("tokens", data=m)
    assert np.allclose(fig.axes[0].images[0].get_array(), m.numpy())
    with pytest.raises(ValueError, match=r"expected \[query_pos, key_pos\]"):
        audit.plot("tokens", data=torch.rand(3, 4))
    fig = audit.plot("positions", data=np.arange(18.0).reshape(3, 6), title="patch")
    assert "patch" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="kind: 'pie'"):
        audit.plot("pie")


def test_png_and_svg(audit, tmp_path):
    paths = write_figures(audit, tmp_path)
    assert {p.suffix for p in paths} == {".png", ".svg"} and len(paths) == 6
    for p in paths:
        head = p.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in p.read_bytes()
    with pytest.raises(ValueError, match="save: .* must end in one of"):
        audit.plot("grid", save=tmp_path / "x.txt")
