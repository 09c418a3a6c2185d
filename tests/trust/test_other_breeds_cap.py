"""Calibration's bank of other breeds is bounded per breed, so calibrating a top-20 run on the full
Stanford Dogs (~17,000 photos of other breeds) does not cost more than training it."""
from dogbreeds.data.records import ImageRecord
from dogbreeds.trust.cli import OTHER_BREED_PHOTOS, _capped_per_breed


def test_other_breeds_are_capped_per_breed_and_the_choice_is_stable():
    many = [ImageRecord(f"b/{i:03d}.jpg", -1, "n0-big", "test") for i in range(OTHER_BREED_PHOTOS + 15)]
    few = [ImageRecord(f"s/{i}.jpg", -1, "n1-small", "test") for i in range(3)]
    kept = _capped_per_breed(list(reversed(many)) + few, OTHER_BREED_PHOTOS)
    big = [r for r in kept if r.breed_id == "n0-big"]
    assert len(big) == OTHER_BREED_PHOTOS
    assert [r.path for r in big] == [f"b/{i:03d}.jpg" for i in range(OTHER_BREED_PHOTOS)]  # first by path, whatever the order given
    assert len([r for r in kept if r.breed_id == "n1-small"]) == 3
