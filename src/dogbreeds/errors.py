"""Typed errors. The CLI prints their message (no traceback) and exits with status 2."""


class DogbreedsError(Exception):
    """Base class: a problem the user can fix; the message says what and how."""


class WeightsError(DogbreedsError):
    """A weights file or directory could not be loaded into the requested model."""


class DataError(DogbreedsError):
    """A dataset root, list, CSV or breed choice is wrong."""


class ImageDecodeError(DogbreedsError):
    """A file could not be turned into an RGB uint8 image."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class EmptyImageError(ImageDecodeError):
    pass


class TruncatedImageError(ImageDecodeError):
    pass


class CorruptImageError(ImageDecodeError):
    pass


class NotAnImageError(ImageDecodeError):
    pass


class TooManyPixelsError(ImageDecodeError):
    pass
