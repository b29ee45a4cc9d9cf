"""The one exception type for bad user input (config values, paths, missing data or weights), and how every entry
point reports it: one line ``error: <message>`` on stderr, exit status 2, no stack trace."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

BAD_INPUT = 2  # the exit status for a ConfigError (argparse uses 2 for a usage error too)


class ConfigError(ValueError):
    """Raised before any heavy work starts; the message names the value and the fix."""


@contextmanager
def exit_on_config_error() -> Iterator[None]:
    """``with exit_on_config_error(): ...`` in an entry point: a ConfigError raised inside prints ``error: <message>``
    and exits with ``BAD_INPUT`` (``SystemExit``, as argparse exits on a usage error). The traceback goes to the
    ``hsd_exp`` logger at debug level (``-v`` shows it)."""
    try:
        yield
    except ConfigError as err:
        logging.getLogger("hsd_exp").debug("config error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(BAD_INPUT) from None
