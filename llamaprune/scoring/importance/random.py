"""Random importance: a seeded baseline, one uniform [0, 1) draw per group in table order.

    >>> random_scores(3, seed=0).tolist() == random_scores(3, seed=0).tolist()
    True
"""

from __future__ import annotations

import numpy as np


def random_scores(num_groups: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(num_groups)
