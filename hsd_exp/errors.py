"""The one exception type for bad user input (config values, paths, missing data or weights)."""


class ConfigError(ValueError):
    """Raised before any heavy work starts; the message names the value and the fix.

    Entry points catch it, print ``error: <message>`` and exit with status 2.
    """
