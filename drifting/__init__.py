"""drifting: Drifting Models (Deng et al. 2026, "Generative Modeling via Drifting") in PyTorch.

Public API: the drifting field (the paper's Algorithm 2), the drifting loss of the authors' code with its global
statistics, the feature-space loss over a frozen encoder, and the generators.
"""

from drifting.drift import (
    DriftStats,
    all_reduce_sum,
    drift_field,
    drift_loss,
    drift_stats,
    field_square_sums,
    scale_sums,
)
from drifting.feature_loss import ClassBatch, FeatureDriftLoss, FeatureStats
from drifting.features import FeatureConfig
from drifting.models.dit import DiT, DiTConfig, build_generator
from drifting.models.generate import generate
from drifting.models.mlp import MLPGenerator
from drifting.models.resnet_mae import ResNetMAE, ResNetMAEConfig

__version__ = "0.1.0"
__all__ = [
    "ClassBatch", "DiT", "DiTConfig", "DriftStats", "FeatureConfig", "FeatureDriftLoss", "FeatureStats",
    "MLPGenerator", "ResNetMAE", "ResNetMAEConfig", "all_reduce_sum", "build_generator", "drift_field", "drift_loss",
    "drift_stats", "field_square_sums", "generate", "scale_sums", "__version__",
]
