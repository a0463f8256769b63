"""Models: torch modules (networks) apart from the estimators that train them, and baselines.

- ``networks.py``: the torch modules of Mult-VAE / Mult-DAE (no training logic)
- ``sparse_layers.py``: sparse input layer and the fused softmax + multinomial NLL output layer
- ``annealing.py``: the KL weight (beta) schedules
- ``vae.py``: the estimators ``MultVAE`` / ``MultDAE`` that train the networks
- ``recvae_network.py``, ``recvae.py``: RecVAE's network (composite prior) and estimator
- ``binary_vae.py``: ``BinaryMultVAE``, Mult-VAE with a Bernoulli (binary code) latent
- ``ease.py``, ``popularity.py``: baselines with the same fit / recommend interface
"""

from __future__ import annotations

from recvae.models.base import Recommender, read_model_meta
from recvae.models.binary_vae import BinaryMultVAE
from recvae.models.ease import EASE
from recvae.models.popularity import Popularity
from recvae.models.recvae import RecVAE
from recvae.models.vae import MultDAE, MultVAE, NonFiniteLossError, resolve_device

__all__ = [
    "BinaryMultVAE", "EASE", "MultDAE", "MultVAE", "NonFiniteLossError", "Popularity", "RecVAE", "Recommender", "load_model",
]

_CLASSES = {cls.__name__: cls for cls in (MultVAE, MultDAE, BinaryMultVAE, RecVAE, EASE, Popularity)}


def load_model(path, device=None) -> Recommender:
    """Load any saved model of the library; the class is read from ``path/model.json``.
    ``device`` is for the neural models (baselines compute with numpy on the CPU)."""
    meta_file, meta = read_model_meta(path)
    name = meta.get("class")
    if name not in _CLASSES:
        raise ValueError(f"{meta_file}: unknown model class {name!r}; expected one of {sorted(_CLASSES)}")
    cls = _CLASSES[name]
    if device is None:
        return cls.load(path)
    resolve_device(device)  # an explicit CUDA without CUDA is an error even for the numpy baselines
    return cls.load(path, device=device) if cls in (MultVAE, MultDAE, BinaryMultVAE, RecVAE) else cls.load(path)
