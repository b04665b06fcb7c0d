"""Export of training runs to ONNX and publication to the model repository."""
