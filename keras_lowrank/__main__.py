"""`python -m keras_lowrank ...`: the `keras-lowrank` command line.

`--help`, `methods` and `inspect` answer without importing Keras (see
`keras_lowrank/__init__.py` and `keras_lowrank_cli`).
"""

import sys

from keras_lowrank_cli import main

if __name__ == "__main__":
    sys.exit(main())
