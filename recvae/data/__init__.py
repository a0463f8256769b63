"""Interaction data, readers, MovieLens files and download, and splits."""

from recvae.data.download import ChecksumError, DownloadError, download
from recvae.data.interactions import Interactions
from recvae.data.user_items import as_csr, training_matrix
from recvae.data.preprocessing import Preprocessing
from recvae.data.readers import read_interactions, read_table
from recvae.data.movielens import (
    DATASETS as MOVIELENS_DATASETS,
    download_movielens,
    load_movielens,
    load_movielens_ratings,
    load_movielens_titles,
)
from recvae.data.paths import resolve_data_dir
from recvae.data.splits import HeldOutUsers, StrongSplit, WeakSplit, strong_generalization_split, weak_generalization_split
from recvae.data.time_splits import cutoff_split, leave_last_split, make_split

__all__ = [
    "ChecksumError",
    "DownloadError",
    "HeldOutUsers",
    "Interactions",
    "MOVIELENS_DATASETS",
    "Preprocessing",
    "StrongSplit",
    "WeakSplit",
    "as_csr",
    "training_matrix",
    "cutoff_split",
    "download",
    "download_movielens",
    "load_movielens",
    "load_movielens_ratings",
    "leave_last_split",
    "load_movielens_titles",
    "make_split",
    "read_interactions",
    "read_table",
    "resolve_data_dir",
    "strong_generalization_split",
    "weak_generalization_split",
]
