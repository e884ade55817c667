"""Errors ember raises for foreseeable user mistakes.

Each message names the file, node, op or argument at fault and says what to do, so users never have to read a
TVM traceback for a case we could foresee. All derive from :class:`EmberError`.
"""


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class ModelLoadError(EmberError):
    """A model file is missing, unreadable or not the format it claims to be."""


class UnsupportedOpError(EmberError):
    """The model uses an operator ember cannot import or compile."""

    def __init__(self, message: str, ops=(), nodes=()):
        super().__init__(message)
        self.ops = tuple(ops)
        self.nodes = tuple(nodes)


class InputError(EmberError, ValueError):
    """Inputs given at run time do not match what the model was compiled for."""


class ArtifactError(EmberError):
    """An artifact is incomplete, tampered with, or built for something else."""


class TargetError(EmberError, ValueError):
    """An unknown target name, or a target this machine cannot build or run."""


class ConfigError(EmberError, ValueError):
    """A configuration value is out of range or of the wrong kind."""
