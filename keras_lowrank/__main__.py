"""`python -m keras_lowrank ...`: the `keras-lowrank` command line."""

import sys

from keras_lowrank.cli import main

if __name__ == "__main__":
    sys.exit(main())
