"""Pure driver stages of a step that add a batch field (no worker involved)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fipo_trainer.algorithms.advantages import compute_advantage
from fipo_trainer.data.batch import Batch


def advantages(batch: Batch, algorithm: Any) -> Batch:
    """The ``advantages`` field: the estimator over each uid group's scores (pure)."""
    scores = torch.tensor(np.asarray(batch["score"], dtype=np.float32))
    extra = (
        {"norm_adv_by_std_in_grpo": algorithm.norm_adv_by_std_in_grpo}
        if algorithm.adv_estimator == "grpo"
        else {}
    )
    adv = compute_advantage(
        algorithm.adv_estimator, scores, batch["response_mask"], list(batch["uid"]), **extra
    )
    return Batch({"advantages": adv})
