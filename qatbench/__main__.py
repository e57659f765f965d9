"""`python -m qatbench ...` (and `torchrun -m qatbench ...`): the command line."""

import sys

from qatbench.cli import main

sys.exit(main())
