"""Checkpoint -> exported model folder (ONNX graphs, model.yaml, arrays.npz, card.md); see onnx_export."""
