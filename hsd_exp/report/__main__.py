"""``python -m hsd_exp.report DIR [DIR ...]``: the comparison report (see ``hsd_exp.report.tables``)."""

import sys

from hsd_exp.report.tables import main

if __name__ == "__main__":
    sys.exit(main())
