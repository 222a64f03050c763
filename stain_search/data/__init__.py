"""Data: reading images, the built-in tissue phantom, dataset folders, tiling.

- :mod:`~stain_search.data.io` — any image file → (H, W, 3) uint8 RGB; atomic writes.
- :mod:`~stain_search.data.stain` — Beer–Lambert stain model (Ruifrok & Johnston, 2001).
- :mod:`~stain_search.data.phantom` — the generated, paired built-in datasets.
- :mod:`~stain_search.data.folders` — dataset layouts (cyclegan, bci, mist, pair).
- :mod:`~stain_search.data.datasets` — PyTorch datasets for training and evaluation.
- :mod:`~stain_search.data.prepare` — cut large images into a tiled dataset.
- :mod:`~stain_search.data.slides` — whole slides (OpenSlide, tifffile, Pillow) read region
  by region, with levels and µm/px; :mod:`~stain_search.data.resolution` — level and
  resampling to a µm/px.
- :mod:`~stain_search.data.augment` — HED colour jitter of H&E crops (``data.hed_jitter``).
"""

from stain_search.data.datasets import (EvalDataset, UnpairedDataset, check_files, to_image,
                                        to_tensor)
from stain_search.data.folders import LAYOUTS, DatasetFiles, resolve_dataset
from stain_search.data.io import IMAGE_EXTENSIONS, image_size, read_image, read_mask, write_image
from stain_search.data.phantom import BUILTIN_DATASETS, builtin_dataset, generate_phantom
from stain_search.data.prepare import prepare_dataset, tissue_mask

__all__ = [
    "BUILTIN_DATASETS", "DatasetFiles", "EvalDataset", "IMAGE_EXTENSIONS", "LAYOUTS",
    "UnpairedDataset", "builtin_dataset", "check_files", "generate_phantom", "image_size",
    "prepare_dataset", "read_image", "read_mask", "resolve_dataset", "tissue_mask", "to_image",
    "to_tensor", "write_image",
]
