"""The one error type users see for bad input: a one-line message naming the key and the fix."""


class ConfigError(ValueError):
    """Raised for invalid configuration or data, before any weights load where possible."""
