"""``python -m thresher.cli ...`` (and ``torchrun -m thresher.cli ...``): the ``thresher`` command."""
import sys

from thresher.cli import main

sys.exit(main())
