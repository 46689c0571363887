"""``python -m knnlm ...`` (and ``torchrun ... -m knnlm build-index ...``): the command line."""

import sys

from knnlm.cli import main

sys.exit(main())
