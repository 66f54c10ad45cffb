"""Tools: fit, predict and evaluate image-gene models."""

__all__: list[str] = []
