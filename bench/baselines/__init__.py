"""What a user would pick instead: FastAPI + torch eager, TorchServe's stock image classifier,
Triton (PyTriton) and Ray Serve on our ONNX model."""
