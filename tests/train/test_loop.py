"""train(recipe) in-process on tiny real photos: the run directory, modes, and failures."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dogbreeds.data.records import ClassInfo
from dogbreeds.errors import DataError, DogbreedsError
from dogbreeds.models.factory import create_model, load_run
from dogbreeds.train import features as features_module
from dogbreeds.train.loop import TrainHooks, TrainingDiverged, train
from dogbreeds.train.recipe import Recipe
from dogbreeds.train.session import seed_everything

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_top1", "val_top5", "ema_val_top1", "lr", "epoch_time",
               "images_per_s", "skipped_files"}


def _initial_weights(recipe: Recipe) -> dict:
    """The weights train() starts from: same seed, same constructor."""
    seed_everything(recipe.seed)
    return create_model(recipe.model, num_classes=3, drop_path_rate=recipe.drop_path).state_dict()


def test_run_directory_holds_everything_later_steps_read(tiny_data, tiny_recipe, tmp_path):
    recipe = tiny_recipe(tiny_data, tmp_path / "run", epochs=2)
    run = train(recipe)
    assert run == tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert METRIC_KEYS <= set(lines[0]) and all(0 <= line["val_top1"] <= 1 for line in lines)
    assert lines[1]["lr"] < lines[0]["lr"]
    assert Recipe.from_yaml(run / "config.yaml") == recipe
    assert ClassInfo.load(run / "classes.json") == load_run(run).classes
    split = json.loads((run / "split.json").read_text())
    assert split["counts"]["train"] == 18 and split["counts"]["val"] == 6
    sidecar = json.loads((run / "checkpoints" / "best.json").read_text())
    assert sidecar["preprocessing"]["input_size"] == 32 and sidecar["model"] == "convnext_atto"
    assert sidecar["extra"]["weights"] in ("raw", "ema")
    best_epoch = max(lines, key=lambda line: max(line["val_top1"], line["ema_val_top1"]))["epoch"]
    assert sidecar["extra"]["epoch"] == best_epoch
    loaded = load_run(run)
    assert loaded.preprocessing.input_size == 32 and not loaded.model.training
    assert (run / "checkpoints" / "resume.pt").is_file()
    # weights moved, and a finished run rerun is a no-op that keeps them
    last = load_file(run / "checkpoints" / "last.safetensors")
    assert not torch.equal(last["stages.0.blocks.0.conv_dw.weight"],
                           _initial_weights(recipe)["stages.0.blocks.0.conv_dw.weight"])
    train(recipe)
    assert all(torch.equal(v, load_file(run / "checkpoints" / "last.safetensors")[k]) for k, v in last.items())
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


def test_frozen_backbone_trains_the_head_on_cached_features(tiny_data, tiny_recipe, tmp_path, monkeypatch):
    recipe = tiny_recipe(tiny_data, tmp_path / "frozen", freeze="backbone", epochs=3, lr=1e-2)
    run = train(recipe)
    cached = list((run / "features").glob("*.pt"))
    assert len(cached) == 1
    weights, initial = load_file(run / "checkpoints" / "last.safetensors"), _initial_weights(recipe)
    changed = {k for k in weights if not torch.equal(weights[k], initial[k])}
    assert changed == {"head.fc.weight", "head.fc.bias"}
    # Same model, weights, size and files: the second run reads the cache instead of the photos.
    monkeypatch.setattr(features_module, "extract_features", lambda *a, **k: pytest.fail("features recomputed"))
    import dogbreeds.trust.cli as trust_cli  # the calibration after training embeds the photos on its own

    monkeypatch.setattr(trust_cli, "calibrate_after_training", lambda *args, **kwargs: None)
    for path in (run / "checkpoints").iterdir():
        path.unlink()
    train(recipe)
    assert torch.equal(load_file(run / "checkpoints" / "last.safetensors")["head.fc.weight"], weights["head.fc.weight"])


def _boxed_root(mini_root, dest, breeds=("n02085936-Maltese_dog", "n02099601-golden_retriever",
                                        "n02088094-Afghan_hound"), per_breed=5):
    """A Stanford Dogs root with Images/ and Annotation/ (boxes), no lists: a seeded split."""
    import shutil

    for breed in breeds:
        (dest / "Images" / breed).mkdir(parents=True)
        (dest / "Annotation" / breed).mkdir(parents=True)
        photos = [p for p in sorted((mini_root / "Images" / breed).glob("*.jpg"))
                  if (mini_root / "Annotation" / breed / p.stem).is_file()][:per_breed]
        for photo in photos:
            shutil.copy(photo, dest / "Images" / breed / photo.name)
            shutil.copy(mini_root / "Annotation" / breed / photo.stem, dest / "Annotation" / breed / photo.stem)
    return dest


def test_frozen_backbone_with_crop_to_box_caches_features_of_the_box_crops(mini_root, tiny_recipe, tmp_path):
    from dogbreeds.data.decode import decode_image
    from dogbreeds.data.sources import load_dataset
    from dogbreeds.data.transforms import build_eval_transform, crop_to_box
    from dogbreeds.models.factory import load_run
    from dogbreeds.train.features import pooled_features

    root = _boxed_root(mini_root, tmp_path / "dogs")
    cached = {}
    for crop in (None, "largest"):
        recipe = tiny_recipe(root, tmp_path / f"run-{crop}", freeze="backbone", epochs=1,
                             augment=Recipe().augment.preset("quick", crop_to_box=crop))
        files = list((train(recipe) / "features").glob("*.pt"))
        assert len(files) == 1
        cached[crop] = torch.load(files[0], weights_only=True)
    whole, cropped = cached[None], cached["largest"]
    assert whole["key"] != cropped["key"]
    assert torch.equal(whole["val_x"], cropped["val_x"])  # val photos stay whole
    assert whole["train_x"].shape == cropped["train_x"].shape
    assert not torch.allclose(whole["train_x"], cropped["train_x"])
    # the first train photo's cached features are the frozen backbone's on its largest dog's crop (margin 0.1)
    record = load_dataset(root, breeds="all", val_fraction=0.2, test_fraction=0.2, seed=recipe.seed).train[0]
    assert record.boxes
    loaded = load_run(tmp_path / "run-largest")
    image = crop_to_box(decode_image(record.path), record.boxes, "largest", 0.1)
    with torch.no_grad():
        expected = pooled_features(loaded.model, build_eval_transform(loaded.preprocessing)(image)[None])[0]
    torch.testing.assert_close(cropped["train_x"][0], expected, atol=1e-4, rtol=1e-4)


def test_last_n_stages_trains_only_the_last_stages_and_head(tiny_data, tiny_recipe, tmp_path):
    recipe = tiny_recipe(tiny_data, tmp_path / "partial", freeze="last_n_stages:1", epochs=1)
    weights, initial = load_file(train(recipe) / "checkpoints" / "last.safetensors"), _initial_weights(recipe)
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k in weights if not torch.equal(weights[k], initial[k])}
    assert changed == {"stages.3", "head.norm", "head.fc"}


def test_gradient_accumulation_matches_one_big_batch(tiny_data, tiny_recipe, tmp_path):
    common = dict(epochs=1, drop_path=0.0, ema_decay=None, augment=Recipe().augment.preset("none"))
    one = train(tiny_recipe(tiny_data, tmp_path / "one", batch_size=4, accum_steps=1, **common))
    two = train(tiny_recipe(tiny_data, tmp_path / "two", batch_size=4, accum_steps=2, **common))
    a, b = (load_file(run / "checkpoints" / "last.safetensors") for run in (one, two))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_checkpoint(tiny_data, tiny_recipe, tmp_path):
    def poison(epoch, index, images):
        return images * float("nan") if (epoch, index) == (1, 2) else images

    recipe = tiny_recipe(tiny_data, tmp_path / "nan", epochs=3)
    with pytest.raises(TrainingDiverged, match=r"epoch 1 step 6 ") as info:
        train(recipe, TrainHooks(on_micro_batch=poison))
    assert "--lr" in str(info.value)
    checkpoints = tmp_path / "nan" / "checkpoints"
    state = torch.load(checkpoints / "resume.pt", weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4
    last = load_file(checkpoints / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in last.values() if v.is_floating_point())
    assert all(torch.equal(v, state["model"][k]) for k, v in last.items())
    # Without the poison, rerunning resumes from that checkpoint and finishes.
    train(recipe)
    assert len((tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("message", ["DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB",
                                     "CUDA out of memory. Tried to allocate 2.00 GiB"])
def test_out_of_memory_suggests_smaller_micro_batches(tiny_data, tiny_recipe, tmp_path, message):
    def explode(epoch, index, images):
        raise RuntimeError(message)

    with pytest.raises(DogbreedsError, match="--batch-size") as info:
        train(tiny_recipe(tiny_data, tmp_path / "oom"), TrainHooks(on_micro_batch=explode))
    assert "--accum-steps 2" in str(info.value)


def test_resume_with_a_different_recipe_names_the_difference(tiny_data, tiny_recipe, tmp_path):
    train(tiny_recipe(tiny_data, tmp_path / "run", epochs=1))
    with pytest.raises(DogbreedsError, match=r"lr: saved 0.001, now 0.005") as info:
        train(tiny_recipe(tiny_data, tmp_path / "run", epochs=1, lr=5e-3, workers=2))
    assert "--config" in str(info.value)


def test_one_breed_is_not_a_classifier(tiny_data, tiny_recipe, tmp_path):
    with pytest.raises(DataError, match="at least two"):
        train(tiny_recipe(tiny_data, tmp_path / "one", breeds="top1"))


def test_unknown_model_is_create_models_error(tiny_data, tiny_recipe, tmp_path):
    with pytest.raises(DogbreedsError, match="convnext_atoo"):
        train(tiny_recipe(tiny_data, tmp_path / "bad", model="convnext_atoo"))


def test_files_that_cannot_be_decoded_are_skipped_and_reported_per_epoch(tiny_data, tiny_recipe, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for breed in sorted(p for p in data.iterdir() if p.is_dir()):
        for i in range(3):
            (breed / f"zz_broken_{i}.jpg").write_bytes(b"this is not a JPEG" * 10)
    run = train(tiny_recipe(data, tmp_path / "run", epochs=1, augment=Recipe().augment.preset("quick")))
    split = json.loads((run / "split.json").read_text())
    broken_in_train = sorted(f for f in split["files"]["train"] if "zz_broken" in f)
    assert broken_in_train, "the seeded split should put some broken files into train"
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    # the epoch drops the images that do not fill a last step, so a broken one may go unseen
    assert 1 <= line["skipped_files"] <= len(broken_in_train)
    assert all("zz_broken" in item["path"] and item["reason"] for item in line["skipped"])


def test_atomic_write_replaces_whole_files_with_normal_permissions(tmp_path):
    import os

    from dogbreeds.train.checkpoint import atomic_write_text

    target = tmp_path / "config.yaml"
    atomic_write_text(target, "a: 1\n")
    atomic_write_text(target, "a: 2\n")
    assert target.read_text() == "a: 2\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        from dogbreeds.train.checkpoint import atomic_write
        atomic_write(target, fail)
    assert target.read_text() == "a: 2\n" and len(list(tmp_path.iterdir())) == 1


@pytest.mark.slow
def test_decoding_workers_do_not_change_the_result(tiny_data, tiny_recipe, tmp_path):
    """Augmentation is seeded per sample, and the loader never touches the training process's
    random streams, so --workers is free to change (it may differ on resume)."""
    runs = [train(tiny_recipe(tiny_data, tmp_path / f"w{workers}", epochs=1, workers=workers))
            for workers in (0, 2)]
    a, b = (load_file(run / "checkpoints" / "last.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_feature_cache_key_changes_with_anything_the_features_depend_on(tiny_data, tmp_path):
    import os

    from dogbreeds.data.sources import load_dataset
    from dogbreeds.train.features import feature_cache_key

    splits = {"train": load_dataset(tiny_data, breeds="all").train}
    pre = {"input_size": 32}
    key = feature_cache_key("convnext_atto", None, pre, splits)
    assert key == feature_cache_key("convnext_atto", None, dict(pre), splits)
    assert key != feature_cache_key("convnext_femto", None, pre, splits)
    assert key != feature_cache_key("convnext_atto", None, {"input_size": 48}, splits)
    assert key != feature_cache_key("convnext_atto", None, pre, {"train": splits["train"][1:]})
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    with_weights = feature_cache_key("convnext_atto", str(weights), pre, splits)
    weights.write_bytes(b"xy")  # a replaced weights file under the same name
    assert with_weights != feature_cache_key("convnext_atto", str(weights), pre, splits)
    photo = splits["train"][0].path
    stat = os.stat(photo)
    try:
        os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an edited photo
        assert key != feature_cache_key("convnext_atto", None, pre, splits)
    finally:
        os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_damaged_feature_cache_and_resume_state_are_named_with_what_to_do(tmp_path):
    from dogbreeds.train.checkpoint import load_resume_state
    from dogbreeds.train.features import cached_features

    key = "a" * 64
    damaged = tmp_path / f"{key[:24]}.pt"
    damaged.write_bytes(b"not a torch file")
    with pytest.raises(DogbreedsError, match="Delete it") as info:
        cached_features(tmp_path, key, lambda: pytest.fail("a damaged cache must not be silently replaced"))
    assert str(damaged) in str(info.value)
    foreign = tmp_path / "resume.pt"
    torch.save({"format": "something-else"}, foreign)
    with pytest.raises(DogbreedsError, match="not a dogbreeds resume state") as info:
        load_resume_state(foreign)
    assert str(foreign) in str(info.value) and "--out" in str(info.value)


def test_fine_tuning_from_a_run_trains_with_this_recipes_drop_path_not_the_runs(tiny_data, tiny_recipe, tmp_path):
    """A run's checkpoint remembers its drop_path_rate (0.1 here); a run started from it with
    drop_path 0 must train and save 0, as its config.yaml says (it silently kept 0.1 before)."""
    first = train(tiny_recipe(tiny_data, tmp_path / "first", epochs=1, drop_path=0.1, ema_decay=None))
    assert load_run(first).model.dogbreeds_kwargs["drop_path_rate"] == 0.1
    second = train(tiny_recipe(tiny_data, tmp_path / "second", epochs=1, drop_path=0.0, ema_decay=None,
                               weights=str(first)))
    model = load_run(second).model
    assert model.dogbreeds_kwargs["drop_path_rate"] == 0.0
    assert Recipe.from_yaml(second / "config.yaml").drop_path == 0.0
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert all(rate == 0.0 for rate in rates)  # timm builds no DropPath (Identity) at 0: none, or all at 0
