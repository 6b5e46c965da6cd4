"""composition: how the chosen adapters act on a model."""
