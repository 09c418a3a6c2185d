"""Detector checkpoints are read like breed checkpoints: a FIFO is refused before it is opened
(it used to block), and metadata that is not JSON or not an object is a named WeightsError."""
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

from dogbreeds.errors import WeightsError
from dogbreeds.detect.model import FORMAT, METADATA_KEY, read_detector_meta


def test_a_fifo_is_refused_at_once(tmp_path):
    fifo = tmp_path / "best.safetensors"
    os.mkfifo(fifo)
    done = {}

    def read():
        try:
            read_detector_meta(fifo)
        except WeightsError as exc:
            done["error"] = str(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO as a detector checkpoint blocked"
    assert "best.safetensors" in done["error"]


@pytest.mark.parametrize("entry, words", [("{not json", "not valid JSON"), ("[1, 2]", "not an object")])
def test_bad_metadata_is_named(tmp_path, entry, words):
    path = tmp_path / "best.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": FORMAT, METADATA_KEY: entry})
    with pytest.raises(WeightsError) as info:
        read_detector_meta(path)
    assert words in str(info.value) and str(path) in str(info.value)
