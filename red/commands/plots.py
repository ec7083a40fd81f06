"""matplotlib is optional (``pip install 'red[plots]'``): commands that plot get pyplot
through :func:`pyplot`, which says in one line when it is missing so that they write
their JSON and skip the plots."""
from __future__ import annotations

import sys

INSTALL_HINT = "pip install 'red[plots]'"


def pyplot(command: str, wrote: str):
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None when matplotlib
    is not installed, after one line on stderr: ``red COMMAND: matplotlib is not
    installed; wrote WROTE without plots (pip install 'red[plots]')``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"red {command}: matplotlib is not installed; wrote {wrote} without plots ({INSTALL_HINT})",
              file=sys.stderr, flush=True)
        return None
    return plt
