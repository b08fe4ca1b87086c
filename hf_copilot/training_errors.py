"""Errors that stop training; their own module so the trainer and its phases share them."""


class NonFiniteTrainingError(RuntimeError):
    """A NaN or infinite loss or gradient norm: raised before the step's update, so no checkpoint holds it."""


__all__ = ["NonFiniteTrainingError"]
