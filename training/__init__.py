"""Small components of the training loop in ``train.py``: config, optimiser, checkpoints, metrics."""
