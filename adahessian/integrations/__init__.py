"""Integrations with training frameworks (README, "With timm, Lightning and the Hugging
Face Trainer"). Each submodule imports its framework when imported itself, so
``import adahessian`` never needs one: ``adahessian.integrations.timm``,
``adahessian.integrations.lightning``, ``adahessian.integrations.transformers``."""
