"""Shipped pretrained weights of the model zoo (see ``train_zoo.py`` to reproduce them)."""
