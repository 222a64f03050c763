"""From the best trial to deployment.

- :mod:`~stain_search.deploy.select` — rank a search's trial × epoch checkpoints by its
  objective(s), with constraints and the Pareto front (`stain-search best`).
- :mod:`~stain_search.deploy.export` — a checkpoint's generator G as a self-contained
  folder (safetensors, model.json, ONNX/TorchScript), registered in the MLflow Model
  Registry as a pyfunc under an alias (`stain-search export`).
- :mod:`~stain_search.deploy.model_io` — load an export, a checkpoint or models:/name@alias.
- :mod:`~stain_search.deploy.translate` — the translator: G over tiles, images and whole
  slides (`stain-search translate`), built from
  :mod:`~stain_search.deploy.tiling` (tiles, window, column-strip blending),
  :mod:`~stain_search.deploy.norm_stats` (global/kernel/tile instance-norm statistics),
  :mod:`~stain_search.data.resolution` (level and resampling to the model's µm/px),
  :mod:`~stain_search.deploy.stain_norm` (Macenko/Reinhard input normalisation) and
  :mod:`~stain_search.deploy.pyramid` (OME-TIFF and OpenSlide-readable pyramidal TIFF out).
  Slides are read by :mod:`stain_search.data.slides`.
"""
