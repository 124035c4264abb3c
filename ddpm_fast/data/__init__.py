"""Data pipeline: listing and validation, the 90/5/5 split, the embedded default data set,
and loaders with interchangeable backends (torch, cache, dali)."""
from .build import BACKENDS, build_loader, data_channels, load_images, load_sample
from .embedded import EMBEDDED_SIZE, embedded_images
from .listing import EmptyDatasetError, list_images, validate_images
from .split import split_files

__all__ = ["build_loader", "load_images", "load_sample", "data_channels", "list_images", "split_files",
           "validate_images", "embedded_images", "EmptyDatasetError", "BACKENDS", "EMBEDDED_SIZE"]
