"""Fine-tuning of registry backbones on ImageFolder data (see :mod:`training.trainer`)."""
