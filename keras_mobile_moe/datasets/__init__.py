"""Datasets: the small CIFAR-100 fixture shipped with the package."""

from keras_mobile_moe.datasets import cifar100
