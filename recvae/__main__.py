"""``python -m recvae`` (and ``torchrun -m recvae``): the command line."""

import sys

from recvae.cli import main

sys.exit(main())
