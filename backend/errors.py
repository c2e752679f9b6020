"""Errors that cross module boundaries; the server maps each to an HTTP status with its message."""


class TandemError(Exception):
    """Base class: the message is meant for the person reading Label Studio's error panel."""

    status_code = 500


class ConfigError(TandemError):
    """The labeling config (or a label mapping) cannot be served."""

    status_code = 422


class MediaError(TandemError):
    """One task's image could not be fetched or decoded; the rest of the batch goes on."""

    status_code = 422


class ModelLoadError(TandemError):
    """Weights could not be loaded (missing file, offline hub name, corrupt checkpoint)."""

    status_code = 503


class SettingsError(TandemError):
    """An option or environment variable has a value Tandem cannot run with."""

    status_code = 500
