import sys

from recvae.cli import main

sys.exit(main())
