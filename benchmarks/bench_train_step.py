"""ConvNeXt-T training step images/s: plain timm loop vs dogbreeds' settings, interleaved. Same as
`dogbreeds bench --parts training`; extra arguments are passed on (e.g. --quick, --out -)."""
import sys

from dogbreeds.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--parts", "training", *sys.argv[1:]]))
