"""recvae: Mult-VAE and Mult-DAE for collaborative filtering (Liang et al., WWW 2018)."""

__version__ = "0.1.0"
