"""The configuration's one error: a setting that is missing or invalid."""

from __future__ import annotations


class SettingsError(ValueError):
    """A setting is missing or invalid.

    Attributes:
        setting: the environment variable name, e.g. ``PUSHSVC_JWT_SECRET``.
    """

    def __init__(self, setting: str, message: str) -> None:
        self.setting = setting
        super().__init__(f"{setting}: {message}")
