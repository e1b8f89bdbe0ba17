"""Static structured pruning (torch-pruning) to a compute budget: the baseline NENNI is measured against.

A pruned model is saved as a model directory of kind "pruned" (nenni.io): it rebuilds from the original
architecture and the layer widths stored in its weights (models/resize.py), without the pruning library.
"""

from .prune import IMPORTANCES, PruneConfig, PruneResult, prune, residual_reaching, total_macs

__all__ = ["IMPORTANCES", "PruneConfig", "PruneResult", "prune", "residual_reaching", "total_macs"]
