"""The model: registry and loading, hook names, activation capture, the shared-model lock, predictions."""
