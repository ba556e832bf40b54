"""Errors raised on bad input. Each says what was wrong and what to do; none loses state."""


class MegalocError(Exception):
    """Base class: every error the package raises on bad input."""


class ImageDecodeError(MegalocError):
    """An image could not be decoded (unsupported encoding, wrong step, corrupt data)."""


class DescriptorSizeError(MegalocError):
    """A descriptor has the wrong size or is not finite."""


class MapFileError(MegalocError):
    """A map file is truncated, foreign, from another model, or of another version."""


class WeightsError(MegalocError):
    """Model weights are missing or do not match the expected layout."""


class BagError(MegalocError):
    """A rosbag cannot be read, or lacks the requested topic."""


class DuplicateId(MegalocError):
    """A keyframe id is already in the map."""
