"""reinforce-cot: teach vision-language (and text) models to reason step by step with TRL + Hydra."""

import os

# One thread per process unless the user chose: with 2 threads and a busy neighbour a tiny step went
# from 0.06 s to 5 s on the 2-core machines this project is tested on.
os.environ.setdefault("OMP_NUM_THREADS", "1")

__version__ = "0.1.0"

from reinforce_cot import overrides as _overrides  # noqa: E402, F401  (registers key_check, which conf/train.yaml lists)
