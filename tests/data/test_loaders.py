"""Loaders over real photos: reproducible across worker counts, bad files skipped and reported."""
from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from dogbreeds.data.loaders import SkippedFiles, make_loader
from dogbreeds.data.records import ImageRecord
from dogbreeds.data.transforms import AugmentConfig, build_eval_transform, build_train_transform
from dogbreeds.preprocessing import Preprocessing

PP = Preprocessing(input_size=64)  # small inputs keep the tests fast on two shared cores


@pytest.fixture(scope="module")
def records(mini_root) -> list[ImageRecord]:
    out = []
    for label, breed in enumerate(["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]):
        for path in sorted((mini_root / "Images" / breed).glob("*.jpg"))[:5]:
            out.append(ImageRecord(str(path), label, breed, "train"))
    return out


def _epoch(loader):
    return [(b.images, b.labels, b.indices) for b in loader]


def _assert_same_epoch(a, b):
    assert len(a) == len(b)
    for (images_a, labels_a, idx_a), (images_b, labels_b, idx_b) in zip(a, b):
        assert torch.equal(idx_a, idx_b) and torch.equal(labels_a, labels_b)
        assert torch.equal(images_a, images_b)


def test_same_seed_and_epoch_same_tensors_with_0_or_2_workers(records):
    transform = build_train_transform(PP, AugmentConfig())
    main_loader = make_loader(records, transform, 4, shuffle=True, seed=7, epoch=3, workers=0)
    worker_loader = make_loader(records, transform, 4, shuffle=True, seed=7, epoch=3, workers=2)
    in_process, in_workers = _epoch(main_loader), _epoch(worker_loader)
    assert len(in_process) == 3
    _assert_same_epoch(in_process, in_workers)
    # The workers persist between epochs; the next epoch must still reach them.
    main_loader.set_epoch(4)
    worker_loader.set_epoch(4)
    next_epoch = _epoch(worker_loader)
    _assert_same_epoch(_epoch(main_loader), next_epoch)
    assert not torch.equal(next_epoch[0][0], in_workers[0][0])
    # Every record exactly once, labels matching the records.
    indices = torch.cat([i for _, _, i in in_process])
    assert sorted(indices.tolist()) == list(range(len(records)))
    assert [records[i].label for i in indices] == torch.cat([l for _, l, _ in in_process]).tolist()


def test_another_epoch_gives_another_order_and_other_augmentations(records):
    transform = build_train_transform(PP, AugmentConfig())
    loader = make_loader(records, transform, len(records), shuffle=True, seed=7)
    (first,) = list(loader)
    loader.set_epoch(1)
    (second,) = list(loader)
    assert first.indices.tolist() != second.indices.tolist()
    by_index_first = dict(zip(first.indices.tolist(), first.images))
    by_index_second = dict(zip(second.indices.tolist(), second.images))
    assert not any(torch.equal(by_index_first[i], by_index_second[i]) for i in range(len(records)))
    loader.set_epoch(0)
    (again,) = list(loader)
    assert torch.equal(again.images, first.images)


def test_loader_does_not_move_the_global_random_streams(records):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(make_loader(records[:4], build_train_transform(PP, AugmentConfig()), 2, shuffle=True, seed=1))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_counted_and_reported(records, tmp_path, workers):
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(open(records[0].path, "rb").read()[:3000])
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a photo\n")
    shutil.copy(records[1].path, tmp_path / "good.jpg")
    mixed = [records[2], ImageRecord(str(truncated), 0, "x", "train"), records[3],
             ImageRecord(str(not_image), 1, "y", "train"), records[6]]
    transform = build_eval_transform(PP)
    loader = make_loader(mixed, transform, batch_size=5, shuffle=False, seed=0, workers=workers)

    (batch,) = list(loader)
    assert batch.indices.tolist() == [0, 2, 4]
    assert batch.labels.tolist() == [0, 0, 1]
    clean = list(make_loader([records[2], records[3], records[6]], transform, 3, shuffle=False, seed=0))[0]
    assert torch.equal(batch.images, clean.images)  # the rest of the batch is intact
    assert [s.path for s in batch.skipped] == [str(truncated), str(not_image)]
    assert len(loader.skipped) == 2
    report = loader.skipped.report()
    assert str(truncated) in report and "TruncatedImageError" in report
    assert str(not_image) in report and "NotAnImageError" in report
    assert loader.skipped.to_list()[0]["index"] == 1


def test_a_batch_of_only_bad_files_is_reported_not_yielded(records, tmp_path):
    bad = tmp_path / "empty.jpg"
    bad.write_bytes(b"")
    loader = make_loader([ImageRecord(str(bad), 0, "x", "train"), records[0]], build_eval_transform(PP),
                         batch_size=1, shuffle=False, seed=0)
    batches = list(loader)
    assert [b.indices.tolist() for b in batches] == [[1]]
    assert [s.path for s in loader.skipped] == [str(bad)]
    list(loader)  # a new epoch starts a new report
    assert len(loader.skipped) == 1


def test_distributed_sampler_splits_the_records(records):
    transform = build_eval_transform(PP)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(range(len(records)), num_replicas=2, rank=rank, shuffle=True, seed=3)
        loader = make_loader(records, transform, 10, shuffle=False, seed=3, sampler=sampler)
        (batch,) = list(loader)
        seen.append(batch.indices.tolist())
        loader.set_epoch(1)
        assert list(loader)[0].indices.tolist() != seen[-1]
    assert sorted(seen[0] + seen[1]) == list(range(len(records)))
    with pytest.raises(ValueError, match="shuffle=False"):
        make_loader(records, transform, 2, shuffle=True, seed=0, sampler=sampler)


def test_skipped_files_report_is_bounded():
    from dogbreeds.data.loaders import SkippedSample

    skipped = SkippedFiles()
    skipped.add([SkippedSample(i, f"/x/{i}.jpg", "CorruptImageError: bad") for i in range(30)])
    report = skipped.report(max_lines=5)
    assert "skipped 30 file(s)" in report and "... and 25 more" in report


def test_workers_leave_ctrl_c_and_sigterm_to_the_loaders_owner(records):
    """A group kill (terminal Ctrl-C, SLURM, `kill -TERM -PGID`) reaches the workers too: they must
    ignore it, so the process that owns the loader decides (training saves, then stops). A SIGTERM
    from the owner itself (DataLoader's shutdown, multiprocessing at exit) still ends a worker."""
    import multiprocessing
    import os
    import signal
    import subprocess
    import time

    before = set(multiprocessing.active_children())
    loader = make_loader(records[:4], build_eval_transform(PP), 2, shuffle=False, seed=0, workers=1)
    first = _epoch(loader)
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 1, "expected one persistent worker"
    worker = workers[0]
    try:
        for sig in ("-INT", "-TERM"):  # sent by another process, as a group kill is
            subprocess.run(["kill", sig, str(worker.pid)], check=True)
        time.sleep(1.0)
        assert worker.is_alive(), f"the worker died of a signal meant for its owner (exit code {worker.exitcode})"
        _assert_same_epoch(_epoch(loader), first)  # and it still works
        os.kill(worker.pid, signal.SIGTERM)  # from the owner
        worker.join(10)
        assert not worker.is_alive() and worker.exitcode == 0
    finally:
        if worker.is_alive():
            worker.kill()
        loader.dataloader._iterator = None  # no shutdown handshake with a worker that may be gone
        del loader
