"""Pruning: choose structures, set them to zero, and keep them zero while training."""

from .importance import register_importance
from .masks import Masks, apply_masks, combine_masks, load_masks, mask_gradients, save_masks
from .recalibrate import recalibrate_batchnorm
from .recipe import Recipe, load_recipe, recipe_from_dict
from .regularization import bn_scale_l1, group_lasso
from .schedule import GradualSchedule
from .sparsifier import Sparsifier
from .structured import DATA_IMPORTANCE, PruneReport, prune
from .torch_prune import fold_pruned_state_dict, fold_torch_prune
from .unstructured import global_magnitude_masks, is_n_m_sparse, layer_magnitude_mask, n_m_mask

__all__ = [
    "DATA_IMPORTANCE",
    "GradualSchedule",
    "Masks",
    "PruneReport",
    "Recipe",
    "Sparsifier",
    "apply_masks",
    "bn_scale_l1",
    "combine_masks",
    "fold_pruned_state_dict",
    "fold_torch_prune",
    "global_magnitude_masks",
    "group_lasso",
    "is_n_m_sparse",
    "layer_magnitude_mask",
    "load_masks",
    "load_recipe",
    "mask_gradients",
    "n_m_mask",
    "prune",
    "recalibrate_batchnorm",
    "recipe_from_dict",
    "register_importance",
    "save_masks",
]
