"""What training, export and serving share.

Torch-free modules (safe for the service): :mod:`models.preprocessing`, :mod:`models.card`,
:mod:`models.repository`. Torch modules: :mod:`models.backbones.registry` (backbones and CNN-code taps).
"""
