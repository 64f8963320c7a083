"""drifting: Drifting Models (Deng et al. 2026, "Generative Modeling via Drifting") in PyTorch.

The public API: the drifting field (the paper's Algorithm 2) and the drifting loss of the authors' code.
"""

from drifting.drift import DriftStats, all_reduce_sum, drift_field, drift_loss, drift_stats

__version__ = "0.1.0"
__all__ = ["DriftStats", "all_reduce_sum", "drift_field", "drift_loss", "drift_stats", "__version__"]
