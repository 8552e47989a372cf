"""Data layer: image data sets as numpy NHWC float32 in [-1, 1] and deterministic batching.

Knows nothing of attacks or defences; those transform the batches this package yields.
"""
from diffcleanse_jax.data.datasets import (
    DATASET_NAMES,
    FASHION_MNIST_DIR,
    MNIST_DIR,
    SYNTHETIC_KINDS,
    DatasetError,
    list_image_files,
    load_cifar10,
    load_dataset,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    load_mnist,
    match_channels,
    synthetic,
    to_float,
)
from diffcleanse_jax.data.pipeline import BatchIterator, epoch_permutation, flip_mask, shard_batch

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_DIR",
    "MNIST_DIR",
    "SYNTHETIC_KINDS",
    "BatchIterator",
    "DatasetError",
    "epoch_permutation",
    "flip_mask",
    "list_image_files",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_idx",
    "load_image_folder",
    "load_mnist",
    "match_channels",
    "shard_batch",
    "synthetic",
    "to_float",
]
