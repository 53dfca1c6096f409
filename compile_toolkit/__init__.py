"""compile_toolkit: prune, capture, strip and export PyTorch models."""
