"""OCP-style entry point: ``python main.py ...`` runs the same CLI as the ``catforge`` command."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from catforge.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
