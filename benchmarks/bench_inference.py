"""Inference side by side (timm eager, dogbreeds backends, HF, Keras, onnxruntime, int8) against the
matmul ceiling; prints the table (--out FILE writes it too). Same as
`dogbreeds bench --parts inference`; extra arguments are passed on (e.g. --quick, --batches 1,16)."""
import sys

from dogbreeds.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--parts", "inference", *sys.argv[1:]]))
