"""The one base class of the errors a user can act on: the CLI prints their message, without a traceback."""


class DogbenchError(Exception):
    """Bad input or environment (config, data, weights, cache, device); the message says what and the valid choices."""
