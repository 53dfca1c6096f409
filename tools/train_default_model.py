"""Train the built-in DigitsResNet and write its weights and metrics into models/.

The committed weights are the toolkit's default model, so training must be reproducible: a fixed
seed, deterministic algorithms and a single thread give the same bytes on every run of the same
torch build. Outputs are written atomically so an interrupted run never leaves half a file.

    python tools/train_default_model.py [--epochs N] [--seed S] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compile_toolkit.fileio import save_safetensors, staged_path, write_atomic
from compile_toolkit.models import DigitsResNet, load_digits_dataset

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4


def train(epochs: int, seed: int) -> DigitsResNet:
    """Adam with a cosine learning-rate schedule over seeded shuffles of the train split."""
    data = load_digits_dataset()
    torch.manual_seed(seed)
    model = DigitsResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(data.y_train) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=shuffle)
        for batch in order.split(BATCH_SIZE):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` whose arg-max logit equals its label."""
    return (model(x).argmax(dim=1) == y).sum().item() / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=MODELS_DIR)
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    model = train(args.epochs, args.seed)
    seconds = time.perf_counter() - start

    data = load_digits_dataset()
    metrics = {
        "model": "digits-resnet",
        "test_accuracy": accuracy(model, data.x_test, data.y_test),
        "train_accuracy": accuracy(model, data.x_train, data.y_train),
        "epochs": args.epochs,
        "seed": args.seed,
        "torch": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with staged_path(args.out_dir / "digits_resnet.safetensors") as tmp:
        save_safetensors(state, tmp)
    write_atomic(args.out_dir / "digits_resnet.json", (json.dumps(metrics, indent=2) + "\n").encode())
    print(json.dumps(metrics), f"trained in {seconds:.1f}s")


if __name__ == "__main__":
    main()
