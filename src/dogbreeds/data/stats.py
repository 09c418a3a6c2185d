"""Images per breed (train / test / total) and the bar chart that shows which breeds top-N picks.

The chart is the proof of concept's figures 1 and 2 in one file: all breeds sorted by count
with the chosen top-N highlighted, and below it the top-N split into train and test.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .records import breed_display_name
from .sources import has_official_split, scan_source, split_train_test


@dataclass(frozen=True)
class BreedCount:
    breed_id: str
    train: int       # training images (validation is later carved from these)
    test: int
    rank: int        # 1 = most images; ties broken by breed id, as top-N does

    @property
    def total(self) -> int:
        return self.train + self.test

    @property
    def name(self) -> str:
        return breed_display_name(self.breed_id)


@dataclass(frozen=True)
class BreedStats:
    source: str
    test_split: str                  # "official" | "seeded"
    breeds: list[BreedCount]         # sorted by rank

    def top(self, k: int) -> list[BreedCount]:
        return self.breeds[:k]

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "test_split": self.test_split,
            "breeds": [
                {"rank": b.rank, "breed_id": b.breed_id, "name": b.name, "train": b.train, "test": b.test, "total": b.total}
                for b in self.breeds
            ],
        }


def breed_stats(root: str | Path, seed: int = 0, test_fraction: float = 0.2) -> BreedStats:
    """Counts per breed. Sources without an official split are split the way load_dataset
    splits them (stratified by breed, seeded), so the numbers match training."""
    source, records = scan_source(root)
    train, test = split_train_test(records, test_fraction, seed)
    counts: dict[str, list[int]] = {}
    for split_index, items in enumerate((train, test)):
        for record in items:
            counts.setdefault(record.breed_id, [0, 0])[split_index] += 1
    totals = {b: sum(c) for b, c in counts.items()}
    order = sorted(totals, key=lambda b: (-totals[b], b))  # the same ranking as top_k_breeds
    breeds = [BreedCount(b, counts[b][0], counts[b][1], rank) for rank, b in enumerate(order, start=1)]
    return BreedStats(source, "official" if has_official_split(records) else "seeded", breeds)


def format_table(stats: BreedStats, top: int) -> str:
    width = max(len(b.name) for b in stats.breeds)
    lines = [f"{'rank':>4}  {'breed':<{width}}  {'train':>6} {'test':>6} {'total':>6}  breed id"]
    for b in stats.breeds:
        mark = "*" if b.rank <= top else " "
        lines.append(f"{b.rank:>4}{mark} {b.name:<{width}}  {b.train:>6} {b.test:>6} {b.total:>6}  {b.breed_id}")
    train = sum(b.train for b in stats.breeds)
    test = sum(b.test for b in stats.breeds)
    lines.append(f"{len(stats.breeds)} breeds, {train + test} images ({train} train, {test} test, "
                 f"{stats.test_split} split); * = the top {top}")
    return "\n".join(lines)


def plot_breed_counts(stats: BreedStats, top: int, path: str | Path) -> Path:
    """Write the two-panel bar chart to `path` (PNG or any format matplotlib knows)."""
    from ..plotting import pyplot, save_figure

    plt = pyplot()

    breeds = stats.breeds
    chosen = stats.top(top)
    fig, (all_axis, top_axis) = plt.subplots(2, 1, figsize=(14, 9), gridspec_kw={"height_ratios": [1, 1.1]})

    colours = ["tab:orange" if b.rank <= top else "tab:gray" for b in breeds]
    all_axis.bar(range(len(breeds)), [b.total for b in breeds], color=colours, width=0.85)
    all_axis.set_title(f"Images per breed, all {len(breeds)} breeds (orange: the top {top})")
    all_axis.set_ylabel("images")
    all_axis.set_xlim(-1, len(breeds))
    all_axis.set_xticks(range(len(breeds)))
    all_axis.set_xticklabels([b.name for b in breeds], rotation=90, fontsize=max(3, min(8, 600 // max(len(breeds), 1))))

    positions = range(len(chosen))
    top_axis.bar(positions, [b.train for b in chosen], color="tab:blue", label="train")
    top_axis.bar(positions, [b.test for b in chosen], bottom=[b.train for b in chosen], color="tab:green", label="test")
    for x, b in zip(positions, chosen):
        top_axis.text(x, b.total, str(b.total), ha="center", va="bottom", fontsize=7)
    top_axis.set_title(f"Top {top} breeds: train / test ({stats.test_split} split)")
    top_axis.set_ylabel("images")
    top_axis.set_xticks(list(positions))
    top_axis.set_xticklabels([b.name for b in chosen], rotation=45, ha="right", fontsize=8)
    top_axis.legend()

    fig.tight_layout()
    return save_figure(fig, path, dpi=80)
