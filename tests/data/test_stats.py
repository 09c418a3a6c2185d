"""Per-breed counts and the bar chart, checked against the files on disk."""
from __future__ import annotations

import shutil
from collections import Counter

from PIL import Image

from dogbreeds.data.sources import breed_counts, choose_breeds, load_dataset
from dogbreeds.data.stats import breed_stats, format_table, plot_breed_counts


def test_counts_match_the_files(mini_root):
    stats = breed_stats(mini_root)
    on_disk = Counter(p.parent.name for p in (mini_root / "Images").glob("*/*.jpg"))
    assert {b.breed_id: b.total for b in stats.breeds} == dict(on_disk)
    assert stats.test_split == "official"
    assert sum(b.train for b in stats.breeds) == 2346 and sum(b.test for b in stats.breeds) == 1313
    assert {b.breed_id: b.total for b in stats.breeds} == breed_counts(mini_root)
    # the ranking is the one top-N uses
    assert sorted(b.breed_id for b in stats.top(20)) == choose_breeds("top20", breed_counts(mini_root))
    assert [b.rank for b in stats.breeds] == list(range(1, 121))
    first = stats.breeds[0]
    assert (first.name, first.train, first.test) == ("Afghan hound", 100, 70)
    table = format_table(stats, top=20)
    assert table.count("*") == 21  # 20 marks + the legend
    assert "120 breeds, 3659 images (2346 train, 1313 test, official split)" in table


def test_plot_is_a_valid_png(mini_root, tmp_path):
    path = plot_breed_counts(breed_stats(mini_root), top=20, path=tmp_path / "figs" / "counts.png")
    assert path.is_file() and path.stat().st_size > 10_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1120, 720)


def test_seeded_counts_match_the_training_split(mini_root, tmp_path):
    for breed in ("n02110958-pug", "n02115913-dhole"):
        shutil.copytree(mini_root / "Images" / breed, tmp_path / breed.split("-", 1)[1])
    stats = breed_stats(tmp_path, seed=5, test_fraction=0.25)
    assert stats.source == "folders" and stats.test_split == "seeded"
    dataset = load_dataset(tmp_path, breeds="all", seed=5, test_fraction=0.25)
    for b in stats.breeds:
        assert b.test == sum(r.breed_id == b.breed_id for r in dataset.test)
        assert b.train == sum(r.breed_id == b.breed_id for r in dataset.train + dataset.val)
    assert [(b.breed_id, b.total) for b in stats.breeds] == [("pug", 143), ("dhole", 6)]
