"""Images through the classifier (dxnode/model.py): a whole study streamed batch by batch with its
heatmaps (``streaming``), or one file (``predict``: `dxnode predict`, POST /api/predict)."""
