"""The cost table: every step's GMACs against the paper's Figure 2, and the CLI around it."""
from __future__ import annotations

import json

import pytest

from dogbreeds.cli import main
from dogbreeds.roadmap.table import GMACS_TOLERANCE, PAPER_FIGURE2, format_table, roadmap_rows


@pytest.fixture(scope="module")
def rows():
    return roadmap_rows(input_size=224)


def test_paper_values_are_figure2():
    assert [g for g, _ in PAPER_FIGURE2] == [4.1, 4.5, 4.4, 5.3, 4.6, 4.1, 4.2, 4.2, 4.2, 4.2, 4.2, 4.5]
    assert [t for _, t in PAPER_FIGURE2] == [78.8, 79.4, 79.5, 80.5, 80.6, 79.9, 80.6, 80.6, 81.3, 81.4, 81.5, 82.0]


def test_every_step_costs_what_the_paper_says(rows):
    off = {r.step: (round(r.gmacs, 2), r.paper_gflops) for r in rows if abs(r.gmacs - r.paper_gflops) > GMACS_TOLERANCE}
    assert not off, f"steps whose GMACs are more than {GMACS_TOLERANCE} from the paper's GFLOPs: {off}"
    # Tighter than the tolerance: each step's measured cost rounds to within 0.1 of the paper's.
    assert all(abs(r.gmacs - r.paper_gflops) < 0.1 for r in rows)
    assert all(r.gmacs_match for r in rows)


def test_cost_moves_the_way_the_paper_explains(rows):
    gmacs = [r.gmacs for r in rows]
    assert gmacs[1] > gmacs[0]  # more blocks in stage 3
    assert gmacs[3] > gmacs[2]  # depthwise is cheap, but width 96 more than pays it back
    assert gmacs[4] < gmacs[3]  # inverted: the downsampling shortcuts get narrow
    assert gmacs[5] < gmacs[4]  # the depthwise conv now runs on the narrow width
    assert gmacs[7:11] == [gmacs[6]] * 4  # activations and norms cost no multiply-adds
    assert gmacs[11] > gmacs[10]  # separate 2x2 downsampling convs


def test_format_table_lists_every_step(rows):
    text = format_table(rows)
    assert text.count("\n") == len(rows) + 1
    assert "| 11 | separate downsampling (ConvNeXt-T) | 28.6 | 4.46 | 4.5 | 82.0 |" in text


def test_cli_json_at_small_input(capsys):
    assert main(["roadmap", "--table", "--json", "--input-size", "64"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in data] == [f"roadmap_step{s}" for s in range(12)]
    # Cost scales with pixels; the paper's numbers only compare at 224, so no match is claimed.
    assert data[11]["gmacs"] == pytest.approx(4.46 * (64 / 224) ** 2, rel=0.02)
    assert all(r["gmacs_match"] is None for r in data)


def test_cli_refuses_a_tiny_input(capsys):
    assert main(["roadmap", "--input-size", "16"]) == 2
    assert "--input-size 16 is too small" in capsys.readouterr().err
