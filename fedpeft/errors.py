"""The user-mistake errors the CLI turns into one sentence. They live in a module that
imports nothing, so the CLI can catch them (and print its first line) before torch,
transformers and Flower are loaded."""


class DataError(ValueError):
    """A data source that is missing, malformed or unreachable, in one sentence."""


class ModelError(ValueError):
    """A model that cannot be found or loaded, in one sentence."""
