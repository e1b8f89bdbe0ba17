"""Static structured pruning (torch-pruning) to a compute budget: the baseline NENNI is measured against."""

from .io import is_pruned_dir, load_pruned_model, save_pruned_model
from .prune import IMPORTANCES, PruneConfig, PruneResult, prune, residual_reaching, total_macs

__all__ = [
    "IMPORTANCES",
    "PruneConfig",
    "PruneResult",
    "is_pruned_dir",
    "load_pruned_model",
    "prune",
    "residual_reaching",
    "save_pruned_model",
    "total_macs",
]
