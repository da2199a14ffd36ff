"""The lock report's figure: every group's name is readable, none drawn over another."""
import itertools

import pytest

from freezeasguard.engine.learn.lock_report import lock_figure, plot_lock
from freezeasguard.engine.learn.report import KINDS

# block names of the presets (SD UNets) and of a DiT (many long, numbered blocks)
UNET_BLOCKS = ["conv_in", "time_embedding", *(f"down_blocks.{i}" for i in range(4)), "mid_block",
               *(f"up_blocks.{i}" for i in range(4)), "conv_out"]
DIT_BLOCKS = ["pos_embed", "time_text_embed", *(f"transformer_blocks.{i}" for i in range(19)),
              *(f"single_transformer_blocks.{i}" for i in range(38)), "norm_out", "proj_out"]


def _report(blocks):
    return {"by_block": [{"group": b, "ratio": 0.1 + 0.3 * (i % 3) / 2} for i, b in enumerate(blocks)],
            "by_kind": [{"group": k, "ratio": 0.2} for k in KINDS],
            "rounds": [{"round": r, "illegal_energy_captured": 0.5 / r, "innocent_energy_captured": 0.1 / r}
                       for r in (1, 2, 3)]}


def _overlaps(fig):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in axis.get_ticklabels()
                     if t.get_visible() and t.get_text()]
            found += [(a, b) for (a, ba), (b, bb) in itertools.combinations(boxes, 2) if ba.overlaps(bb)]
        # names must also stay inside the figure, not be cut at its edge
        fb = fig.bbox
        found += [(t.get_text(), "figure edge") for t in ax.get_yticklabels() + ax.get_xticklabels()
                  if t.get_text() and not (fb.x0 <= t.get_window_extent(renderer).x0)]
    return found


@pytest.mark.parametrize("blocks", [UNET_BLOCKS, DIT_BLOCKS], ids=["unet", "dit"])
def test_no_two_tick_labels_overlap(blocks):
    fig = lock_figure(_report(blocks))
    assert not _overlaps(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == blocks  # every block named, in model order


def test_plot_lock_writes_a_png(tmp_path):
    path = plot_lock(_report(UNET_BLOCKS), tmp_path / "report.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
