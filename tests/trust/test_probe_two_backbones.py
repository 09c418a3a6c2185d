"""benchmarks/probe_two_backbones.py: the joined features are what the probe says, and other photos are refused."""
import numpy as np
import pytest


def _arrays(rng, dim, paths):
    out = {}
    for group in ("train", "val", "test", "unknown", "wild_cats", "wild_dogs"):
        out[f"{group}_x"] = rng.normal(size=(len(paths), dim)).astype(np.float32) * 5
        out[f"{group}_paths"] = np.array(paths)
        out[f"{group}_logits"] = rng.normal(size=(len(paths), 3)).astype(np.float32)
    return out


def test_joined_features_average_the_two_cosine_similarities_and_keep_the_first_runs_logits(benchmark_module):
    probe, rng = benchmark_module("probe_two_backbones"), np.random.default_rng(0)
    paths = [f"p{i}.jpg" for i in range(6)]
    first, second = _arrays(rng, 4, paths), _arrays(rng, 7, paths)
    joined = probe.concatenated(first, second)
    x = joined["test_x"]
    assert x.shape == (6, 11)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = (unit(first["test_x"]) @ unit(first["test_x"]).T + unit(second["test_x"]) @ unit(second["test_x"]).T) / 2
    np.testing.assert_allclose(x @ x.T, expected, atol=1e-5)
    assert joined["test_logits"] is first["test_logits"]


def test_runs_over_different_photos_are_refused_naming_the_group(benchmark_module):
    probe, rng = benchmark_module("probe_two_backbones"), np.random.default_rng(1)
    first = _arrays(rng, 4, ["a.jpg", "b.jpg"])
    second = _arrays(rng, 4, ["a.jpg", "b.jpg"])
    second["unknown_paths"] = np.array(["a.jpg", "c.jpg"])
    with pytest.raises(ValueError, match="unknown photos differ"):
        probe.concatenated(first, second)


def test_a_run_without_cached_features_is_an_error_naming_its_file(benchmark_module, tmp_path, capsys):
    probe = benchmark_module("probe_two_backbones")
    assert probe.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "a/trust_measure.npz: no such file" in capsys.readouterr().err
