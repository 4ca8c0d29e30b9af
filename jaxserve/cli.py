"""Shared plumbing of the absl launchers: flag parsing and user errors as one clear line."""
from __future__ import annotations

import re
import sys

from absl import app, flags, logging


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no existing field
        key = str(e).strip("\"'")
        bad = [m.group(1) for a in argv for m in [re.match(r"--config\.([\w.]+)=?", a)]
               if m and m.group(1).split(".")[-1] == key]
        field = bad[0] if bad else key
        sys.stderr.write(f"error: config field {field!r} does not exist\n")
        sys.exit(2)
    except flags.Error as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


def run(main) -> None:
    """app.run(main), with user mistakes (bad config, missing files) reported without a traceback."""
    def wrapped(argv):
        logging.set_verbosity(logging.WARNING)
        try:
            return main(argv)
        except (ValueError, FileNotFoundError) as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
    app.run(wrapped, flags_parser=_parse_flags)
