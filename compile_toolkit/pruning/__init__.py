"""Pruning: choose structures, set them to zero, and keep them zero while training."""

from .importance import register_importance
from .iterative import IterativeResult, iterative, iterative_prune
from .masks import Masks, apply_masks, load_masks, mask_gradients, save_masks
from .recalibrate import recalibrate_batchnorm
from .recipe import Recipe, load_recipe, recipe_from_dict
from .regularization import bn_scale_l1, group_lasso
from .run_recipe import RecipeResult, apply_recipe
from .schedule import GradualSchedule
from .sparsifier import Sparsifier
from .structured import DATA_IMPORTANCE, PruneReport, prune
from .torch_prune import fold_pruned_state_dict, fold_torch_prune
from .unstructured import global_magnitude_masks, is_n_m_sparse, layer_magnitude_mask, n_m_mask

__all__ = [
    "DATA_IMPORTANCE",
    "GradualSchedule",
    "IterativeResult",
    "Masks",
    "PruneReport",
    "Recipe",
    "RecipeResult",
    "Sparsifier",
    "apply_masks",
    "apply_recipe",
    "bn_scale_l1",
    "fold_pruned_state_dict",
    "fold_torch_prune",
    "global_magnitude_masks",
    "group_lasso",
    "is_n_m_sparse",
    "iterative",
    "iterative_prune",
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
