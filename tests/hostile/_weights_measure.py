"""Subprocess of tests/hostile/test_weights.py: load each weights path given, print JSON.

    python tests/hostile/_weights_measure.py [PATH ...]

With no path it only imports what loading needs: its peak RSS is the baseline. With paths,
each is handed to create_model(weights=...) in turn; the output says, per path, the error
class, the first 300 characters of the message and the seconds it took, then the peak RSS
(ru_maxrss) of the whole process. Nothing is allocated between the cases but what the
loader allocates, so peak RSS - baseline bounds what refusing the worst of them cost."""
from __future__ import annotations

import json
import resource
import sys
import time


def main(paths: list[str]) -> None:
    import h5py  # noqa: F401 - imported by the baseline too, so only loading is measured
    import safetensors.torch  # noqa: F401

    from dogbreeds.errors import DogbreedsError
    from dogbreeds.models.factory import create_model

    results = []
    for path in paths:
        start = time.perf_counter()
        try:
            create_model(None, weights=path)
            outcome, message = "loaded", ""
        except DogbreedsError as exc:
            outcome, message = type(exc).__name__, str(exc)
        except BaseException as exc:  # noqa: BLE001 - reported, the test fails on it
            outcome, message = f"uncaught {type(exc).__name__}", str(exc)
        results.append({"path": path, "outcome": outcome, "message": message[:300],
                        "seconds": round(time.perf_counter() - start, 3)})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": round(peak_mb, 1), "results": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
