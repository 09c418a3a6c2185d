"""load_dataset / layout detection / breed choice on the real mini data and tmp layouts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dogbreeds.data.sources import breed_counts, choose_breeds, detect_layout, load_dataset
from dogbreeds.errors import DataError


@pytest.fixture(scope="module")
def mini_dataset(mini_root):
    return load_dataset(mini_root)


def _photos(mini_root: Path, n: int) -> list[Path]:
    return sorted((mini_root / "Images").glob("*/*.jpg"))[:n]


def test_top20_is_the_twenty_big_breeds_of_the_readme(mini_root, mini_dataset):
    # README: the 20 breeds with the most images keep all their train images and about half
    # of their test images; each of the other 100 has 4 train + 2 test = 6 images.
    sizes = {d.name: len(list(d.glob("*.jpg"))) for d in (mini_root / "Images").iterdir()}
    small = [b for b, n in sizes.items() if n == 6]
    big = sorted(b for b, n in sizes.items() if n >= 40)
    assert len(sizes) == 120 and len(small) == 100 and len(big) == 20
    assert list(mini_dataset.classes.breed_ids) == big
    assert mini_dataset.source == "stanford_dogs" and mini_dataset.test_split == "official"
    assert "n02085936-Maltese_dog" in big and mini_dataset.classes.names[0] == "Maltese dog"


def test_official_split_and_stratified_validation(mini_root, mini_dataset):
    def listed(name):
        mat = scipy.io.loadmat(str(mini_root / "lists" / name))
        return {str(np.asarray(c).ravel()[0]) for c in mat["file_list"].ravel()}

    train_list, test_list = listed("train_list.mat"), listed("test_list.mat")
    summary = mini_dataset.split_summary()
    rel = {s: {f.removeprefix("Images/") for f in summary["files"][s]} for s in ("train", "val", "test")}
    assert rel["test"] <= test_list and (rel["train"] | rel["val"]) <= train_list
    assert not (rel["train"] & rel["val"])
    for breed_id, counts in summary["per_breed"].items():
        pool = counts["train"] + counts["val"]
        assert counts["val"] == int(np.floor(pool * 0.1 + 0.5)), breed_id
    assert summary["counts"] == {s: len(rel[s]) for s in rel}
    json.dumps(summary)  # JSON-able
    labels = [r.label for r in mini_dataset.train]
    assert labels == sorted(labels) and set(labels) == set(range(20))
    assert all(r.breed_id == mini_dataset.classes.breed_ids[r.label] for r in mini_dataset.test)


def test_boxes_come_from_the_annotation_xml(mini_dataset):
    record = mini_dataset.train[0]
    assert record.boxes, "every mini image has an annotation"
    box = record.boxes[0]
    assert 0 <= box.xmin < box.xmax <= 224 and 0 <= box.ymin < box.ymax <= 224
    assert any(len(r.boxes) > 1 for r in mini_dataset.train + mini_dataset.test)  # multi-dog photos exist


def test_seeded_validation_is_reproducible_and_independent_of_other_breeds(mini_root, mini_dataset):
    again = load_dataset(mini_root, seed=0)
    assert again.split_summary() == mini_dataset.split_summary()
    other_seed = load_dataset(mini_root, seed=1)
    assert {r.path for r in other_seed.val} != {r.path for r in mini_dataset.val}
    pug_val = {r.path for r in mini_dataset.val if r.breed_id.endswith("pug")}
    alone = load_dataset(mini_root, breeds="pug")
    assert {r.path for r in alone.val} == pug_val and len(alone.classes) == 1


def test_breed_choice_forms(mini_root, tmp_path):
    counts = breed_counts(mini_root)
    assert len(counts) == 120 and sum(counts.values()) == 3659
    assert choose_breeds("Maltese dog, PUG ,n02086240-shih-tzu", counts) == [
        "n02085936-Maltese_dog", "n02086240-Shih-Tzu", "n02110958-pug"]
    assert choose_breeds("maltese_dog", counts) == ["n02085936-Maltese_dog"]
    assert len(choose_breeds("all", counts)) == 120
    top3 = choose_breeds("top3", counts)
    assert top3 == sorted(["n02088094-Afghan_hound", "n02092002-Scottish_deerhound", "n02086240-Shih-Tzu"])
    # ties broken by WordNet id: 3 breeds share 163 images, the two smallest ids win top5
    assert choose_breeds("top5", counts) == sorted(top3 + ["n02085936-Maltese_dog", "n02107683-Bernese_mountain_dog"])
    listing = tmp_path / "breeds.txt"
    listing.write_text("# my breeds\nSamoyed\n\nn02110958-pug  # small\n")
    assert choose_breeds(str(listing), counts) == ["n02110958-pug", "n02111889-Samoyed"]


def test_unknown_breed_lists_close_matches(mini_root):
    with pytest.raises(DataError, match=r"'Maltse dog' \(close: Maltese dog"):
        load_dataset(mini_root, breeds="Maltse dog,pug")
    with pytest.raises(DataError, match="120 breeds"):
        load_dataset(mini_root, breeds="top121")
    with pytest.raises(DataError, match="breeds file not found"):
        load_dataset(mini_root, breeds="missing_breeds.txt")


def _mini_stanford_copy(mini_root: Path, dest: Path, breeds: list[str]) -> Path:
    for breed in breeds:
        shutil.copytree(mini_root / "Images" / breed, dest / "Images" / breed)
    return dest


def test_list_naming_missing_files_is_an_error(mini_root, tmp_path, write_list):
    root = _mini_stanford_copy(mini_root, tmp_path, ["n02115913-dhole"])
    files = sorted(f"n02115913-dhole/{p.name}" for p in (root / "Images" / "n02115913-dhole").iterdir())
    ghosts = [f"n02115913-dhole/ghost_{i}.jpg" for i in range(7)]
    write_list(root / "lists" / "train_list.mat", files[:4] + ghosts)
    write_list(root / "lists" / "test_list.mat", files[4:])
    with pytest.raises(DataError, match=r"names 7 file\(s\) missing.*ghost_0\.jpg.*\.\.\.") as info:
        load_dataset(root, breeds="all")
    assert "train_list.mat" in str(info.value)


def test_lists_whose_labels_disagree_with_folders(mini_root, tmp_path, write_list):
    root = _mini_stanford_copy(mini_root, tmp_path, ["n02115913-dhole", "n02115641-dingo"])
    files = sorted(f"{p.parent.name}/{p.name}" for p in (root / "Images").glob("*/*.jpg"))
    write_list(root / "lists" / "train_list.mat", files, labels=[1] * len(files))  # one label, two breeds
    write_list(root / "lists" / "test_list.mat", [])
    with pytest.raises(DataError, match=r"label 1 is given to both n02115641-dingo/ and n02115913-dhole/"):
        load_dataset(root, breeds="all")


def test_breed_only_in_test_list_has_no_training_image(mini_root, tmp_path, write_list):
    root = _mini_stanford_copy(mini_root, tmp_path, ["n02115913-dhole", "n02115641-dingo"])
    dhole = sorted(f"n02115913-dhole/{p.name}" for p in (root / "Images" / "n02115913-dhole").iterdir())
    dingo = sorted(f"n02115641-dingo/{p.name}" for p in (root / "Images" / "n02115641-dingo").iterdir())
    write_list(root / "train_list.mat", dhole, labels=[2] * 6)  # lists at the root: how lists.tar unpacks
    write_list(root / "test_list.mat", dingo, labels=[1] * 6)
    with pytest.raises(DataError, match="no training image: n02115641-dingo"):
        load_dataset(root, breeds="all")
    dhole_only = load_dataset(root, breeds="dhole")
    assert (len(dhole_only.train), len(dhole_only.val), len(dhole_only.test)) == (5, 1, 0)


def test_test_only_tree_scans_as_its_test_list(mini_root, tmp_path, write_list):
    """An official-layout tree whose train list is empty (someone else's test set): scan_source
    gives its test records with the official split, which `evaluate --split test` scores
    (tests/evaluate); load_dataset, which training uses, still needs training images."""
    from dogbreeds.data.sources import has_official_split, scan_source

    root = _mini_stanford_copy(mini_root, tmp_path, ["n02115913-dhole", "n02115641-dingo"])
    files = sorted(f"{p.parent.name}/{p.name}" for p in (root / "Images").glob("*/*.jpg"))
    write_list(root / "lists" / "train_list.mat", [])
    write_list(root / "lists" / "test_list.mat", files)
    layout, records = scan_source(root)
    assert layout == "stanford_dogs" and has_official_split(records)
    assert sorted(f"{Path(r.path).parent.name}/{Path(r.path).name}" for r in records) == files
    assert {r.split for r in records} == {"test"}
    with pytest.raises(DataError, match="no training image"):
        load_dataset(root, breeds="all")


def test_stanford_layout_without_lists_gets_a_seeded_split(mini_root, tmp_path):
    root = _mini_stanford_copy(mini_root, tmp_path, ["n02110958-pug"])
    data = load_dataset(root, breeds="all", test_fraction=0.2)
    assert data.test_split == "seeded" and data.source == "stanford_dogs"
    assert len(data.test) == round(143 * 0.2)


def _folder_layout(mini_root: Path, root: Path) -> Path:
    photos = _photos(mini_root, 30)
    for i, photo in enumerate(photos):
        breed = ["Golden Retriever", "my-mutt", "Pug (ours)"][i % 3]
        (root / breed).mkdir(parents=True, exist_ok=True)
        suffix = ".JPG" if i % 2 else ".jpeg"
        shutil.copy(photo, root / breed / f"photo_{i}{suffix}")
    (root / "my-mutt" / "notes.txt").write_text("not a photo")
    (root / ".ipynb_checkpoints").mkdir()
    return root


def test_folder_per_breed_layout(mini_root, tmp_path):
    root = _folder_layout(mini_root, tmp_path / "own")
    assert detect_layout(root) == "folders"
    data = load_dataset(root, breeds="all", seed=3, val_fraction=0.2, test_fraction=0.3)
    assert data.source == "folders" and data.test_split == "seeded"
    assert data.classes.breed_ids == ("Golden Retriever", "Pug (ours)", "my-mutt")
    assert [len(data.train), len(data.val), len(data.test)] == [18, 3, 9]  # per breed 10 -> 3 test, 7 -> 1 val
    assert all(Path(r.path).suffix in (".JPG", ".jpeg") for r in data.train)
    assert load_dataset(root, breeds="all", seed=3, val_fraction=0.2, test_fraction=0.3) == data
    assert load_dataset(root, breeds="all", seed=4, val_fraction=0.2, test_fraction=0.3).test != data.test
    assert choose_breeds("pug (OURS)", breed_counts(root)) == ["Pug (ours)"]


def test_empty_breed_folder_is_named(mini_root, tmp_path):
    root = _folder_layout(mini_root, tmp_path / "own")
    (root / "Beagle").mkdir()
    with pytest.raises(DataError, match=r"breed folder has no images: .*Beagle"):
        load_dataset(root, breeds="all")


def test_kaggle_csv_layout(mini_root, tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()  # Kaggle's unlabelled test images must not become a breed
    lines = ["id,breed"]
    for i, photo in enumerate(_photos(mini_root, 12)):
        shutil.copy(photo, tmp_path / "train" / f"img{i:03d}.jpg")
        shutil.copy(photo, tmp_path / "test" / f"t{i:03d}.jpg")
        lines.append(f"img{i:03d},{['boston_bull', 'dingo'][i % 2]}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    data = load_dataset(tmp_path, breeds="all", test_fraction=0.5, val_fraction=0.0)
    assert data.source == "csv" and data.classes.names == ["boston bull", "dingo"]
    assert len(data.train) == len(data.test) == 6
    (tmp_path / "train" / "img000.jpg").unlink()
    with pytest.raises(DataError, match=r"names 1 image\(s\) that do not exist.*img000\.jpg"):
        load_dataset(tmp_path, breeds="all")


def test_root_that_is_no_dataset(tmp_path):
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(DataError, match=r"not a dataset root. Expected Stanford Dogs.*Found: \['readme.md'\]"):
        load_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")
