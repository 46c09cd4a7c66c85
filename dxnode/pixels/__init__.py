"""Stage 3, pixels: the decoders and tables the pixel chain (dxnode/pipeline.py) and its overlays use."""
