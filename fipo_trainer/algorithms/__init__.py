"""Pure tensor math of the trainer: Future-KL, policy losses, advantages, KL, aggregation.

Nothing here knows about Ray, DeepSpeed or I/O; everything distributed calls into it. The
names below load on first use (``fipo_trainer.lazy_exports``): ``algorithms.options``, what
a config may choose, imports no torch.
"""

from fipo_trainer.lazy_exports import lazy_getattr

_WHERE = {
    "compute_advantage": "advantages",
    "register_advantage": "options",
    "aggregate_loss": "aggregation",
    "local_denominator": "aggregation",
    "future_kl": "future_kl",
    "future_kl_reference": "future_kl",
    "PolicyLossConfig": "options",
    "compute_policy_loss": "policy_loss",
    "compute_policy_terms": "policy_loss",
    "register_policy_loss": "options",
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_getattr(__name__, _WHERE)
