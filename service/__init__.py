"""The BentoML service (HTTP): decode + validate per request, Encoder with adaptive batching.

Nothing under ``service/`` imports torch: serving needs only onnxruntime, numpy and Pillow.
"""
