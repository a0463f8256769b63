"""``python -m recvae`` (and ``torchrun -m recvae``): the command line."""

from recvae.launch import main

main()
