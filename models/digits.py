"""scikit-learn's bundled digits images as tensors, with one fixed train/test split.

The digits set ships inside scikit-learn, so the toolkit has real data without any download.
Training, pruning calibration, accuracy checks and tests all read the same split, which is why the
split is fixed (seeded and stratified) and the result is cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

SPLIT_SEED = 0
TEST_FRACTION = 0.25


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled image set split into train and test parts.

    ``x_*`` are float32 images ``[N, C, H, W]``; ``y_*`` are int64 class labels ``[N]``.
    The tensors are shared by every caller of the cached loader: treat them as read-only.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        """Number of distinct labels in the training part."""
        return int(self.y_train.max()) + 1


@lru_cache(maxsize=1)
def load_digits_dataset() -> Dataset:
    """Load the 1797 8x8 digit images scaled to [0, 1], split 75/25 stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(y)).numpy(),
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=y.numpy(),
    )
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return Dataset(
        name="digits",
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
    )
