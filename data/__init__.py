"""Data sets for the benchmark: CIFAR-10/100 (``data.cifar``) and Multi30K."""
