"""What torchrun starts in the distributed tests: the real command line, and each rank's exit code
written to $INFLUENCE_RANK_CODES/rank<N>, so a test can see that every rank left with the same code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from influence_doctor.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    Path(os.environ["INFLUENCE_RANK_CODES"], f"rank{os.environ['RANK']}").write_text(str(code))
    sys.exit(code)
