"""Records: the plain data every source turns into. Nothing downstream knows the source."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Box:
    xmin: int
    ymin: int
    xmax: int
    ymax: int


@dataclass(frozen=True)
class ImageRecord:
    path: str                     # absolute path of the image file
    label: int                    # index into the chosen classes (0..num_classes-1)
    breed_id: str                 # e.g. "n02085936-Maltese_dog" or a folder / CSV name
    split: str                    # "train" | "val" | "test"
    boxes: tuple[Box, ...] = ()   # dog bounding boxes, in the image's own pixel coordinates


def breed_display_name(breed_id: str) -> str:
    """'n02085936-Maltese_dog' -> 'Maltese dog'; 'golden_retriever' -> 'golden retriever'."""
    name = breed_id
    head, sep, tail = name.partition("-")
    if sep and head[:1] == "n" and head[1:].isdigit() and tail:
        name = tail
    return name.replace("_", " ").strip()


@dataclass(frozen=True)
class ClassInfo:
    """label index -> breed id and display name (written as classes.json in a run)."""

    breed_ids: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [breed_display_name(b) for b in self.breed_ids]

    def __len__(self) -> int:
        return len(self.breed_ids)

    def to_json(self) -> list[dict]:
        return [{"index": i, "breed_id": b, "name": breed_display_name(b)} for i, b in enumerate(self.breed_ids)]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, items: list) -> "ClassInfo":
        if items and isinstance(items[0], str):
            return cls(tuple(items))
        return cls(tuple(item["breed_id"] for item in sorted(items, key=lambda it: it["index"])))

    @classmethod
    def load(cls, path: str | Path) -> "ClassInfo":
        return cls.from_json(json.loads(Path(path).read_text()))
