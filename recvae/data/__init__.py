"""Interaction data, readers, MovieLens files and download, and splits."""

from recvae.data.interactions import Interactions
from recvae.data.paths import resolve_data_dir

__all__ = ["Interactions", "resolve_data_dir"]
