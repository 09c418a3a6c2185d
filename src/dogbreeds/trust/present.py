"""The verdict in words, the same on the command line and the web page."""
from __future__ import annotations


def verdict_text(verdict: str, num_breeds: int, closest: str, breed_set: list[str] | None = None) -> str:
    if verdict == "not_a_dog":
        return "This does not look like a dog"
    if verdict == "unknown_breed":
        return f"A dog, but not one of the {num_breeds} breeds this model knows — closest: {closest}"
    if breed_set is not None and not breed_set:  # a LAC set: no breed likely enough for the coverage
        return f"Probably {closest}, but not sure enough to name a breed"
    if breed_set and len(breed_set) > 1:
        return f"{closest} (or one of: {', '.join(breed_set[1:])})"
    return closest
