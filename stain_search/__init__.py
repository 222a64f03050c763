"""stain-search: Ray-distributed hyper-parameter search for CycleGAN virtual staining."""

__version__ = "0.1.0"
