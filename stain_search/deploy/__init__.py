"""From the best trial to deployment.

- :mod:`~stain_search.deploy.select` — rank a search's trial × epoch checkpoints by its
  objective(s), with constraints and the Pareto front (`stain-search best`).
- :mod:`~stain_search.deploy.export` — a checkpoint's generator G as a self-contained
  folder (safetensors, model.json, ONNX/TorchScript), registered in the MLflow Model
  Registry as a pyfunc under an alias (`stain-search export`).
- :mod:`~stain_search.deploy.translate` — tiled, seam-free translation of tiles, images
  and whole slides, with whole-image instance-norm statistics and pyramidal TIFF output
  (`stain-search translate`).
"""
