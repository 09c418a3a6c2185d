"""Throughput and peak memory of the dogbreeds engine against batch size and input size (one fresh
process per point). Same as `dogbreeds bench --parts scaling`; extra arguments are passed on."""
import sys

from dogbreeds.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--parts", "scaling", *sys.argv[1:]]))
