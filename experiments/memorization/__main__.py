"""``python -m experiments.memorization``: the memorization suite (``experiments.memorization.suite``)."""

import sys

from experiments.memorization.suite import main

sys.exit(main())
