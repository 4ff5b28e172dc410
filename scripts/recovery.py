"""The recovery diagram: does the spectral student find the teacher? Now the command `eigenprune recovery`;
this script passes its arguments on (see `eigenprune recovery --help`, docs/recovery.md):

    python scripts/recovery.py CONFIG.yaml --out DIR     # = eigenprune recovery CONFIG.yaml --out DIR
    python scripts/recovery.py --report DIR              # = eigenprune recovery --report DIR
"""

from __future__ import annotations

import sys

from eigenprune.cli import main

if __name__ == "__main__":
    sys.argv = ["eigenprune", "recovery", *sys.argv[1:]]
    main()
