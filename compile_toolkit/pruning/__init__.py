"""Pruning: choose structures, set them to zero, and keep them zero while training."""

from .masks import apply_masks, mask_gradients
from .structured import PruneReport, prune

__all__ = ["PruneReport", "apply_masks", "mask_gradients", "prune"]
