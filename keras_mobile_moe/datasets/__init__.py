"""Datasets: CIFAR-100 (`cifar100.load_data`) and its small fixture shipped
with the package (`cifar100.load_fixture`)."""

from keras_mobile_moe.datasets import cifar100
