"""What the classifier (dxnode/model.py) runs on: model bundles on disk, the engines (ONNX Runtime,
or torch), and the intended use a bundle declares."""
