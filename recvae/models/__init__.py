"""Models: torch modules (networks) apart from the estimators that train them, and baselines.

- ``networks.py``: the torch modules of Mult-VAE / Mult-DAE (no training logic)
- ``sparse_layers.py``: the sparse batch and input layer, and the reused buffers (``Workspace``)
- ``output_layer.py``: the output layer over all items fused with the softmax + multinomial NLL, and scoring
- ``item_parallel.py``: ``parallel="items"``: those two layers and the scoring split over processes by items
- ``annealing.py``: the KL weight (beta) schedules
- ``training_loop.py``: epochs, validation, early stopping, checkpoint state and resume
- ``device.py``: device choice and the bf16 policy
- ``params.py``: hyperparameters declared once: the kinds of values, a model's table of rows
- ``vae.py``: the estimators ``MultVAE`` / ``MultDAE`` that train the networks
- ``recvae_network.py``, ``recvae.py``: RecVAE's network (composite prior) and estimator
- ``binary_vae.py``: ``BinaryMultVAE``, Mult-VAE with a Bernoulli (binary code) latent
- ``hybrid.py``: ``MultVAELinear`` and ``RecVAELinear``, Mult-VAE and RecVAE whose logits add a linear
  item-item path (EASE's / EDLAE's B)
- ``ease.py``, ``edlae.py``, ``popularity.py``: baselines with the same fit / recommend interface
- ``registry.py``: the name a user types -> the class; the registrations are below
"""

from __future__ import annotations

from recvae.errors import InputError
from recvae.models.base import Recommender, read_model_meta
from recvae.models.binary_vae import BinaryMultVAE
from recvae.models.device import resolve_device
from recvae.models.ease import EASE
from recvae.models.edlae import EDLAE
from recvae.models.hybrid import MultVAELinear, RecVAELinear
from recvae.models.popularity import Popularity
from recvae.models.recvae import RecVAE
from recvae.models.registry import make_model, model_class, model_names, name_of, register
from recvae.models.training_loop import NonFiniteLossError
from recvae.models.vae import MultDAE, MultVAE

__all__ = [
    "BinaryMultVAE", "EASE", "EDLAE", "MultDAE", "MultVAE", "MultVAELinear", "NonFiniteLossError", "Popularity",
    "RecVAE", "RecVAELinear", "Recommender",
    "load_model", "make_model", "model_class", "model_names", "register",
]

register("multvae", MultVAE)
register("multdae", MultDAE)
register("binary-multvae", BinaryMultVAE)
register("recvae", RecVAE)
register("multvae-linear", MultVAELinear)
register("recvae-linear", RecVAELinear)
register("ease", EASE)
register("edlae", EDLAE)
register("popularity", Popularity)


def load_model(path, device=None) -> Recommender:
    """Load any saved model of a registered class; the class is read from ``path/model.json``.
    ``device`` is for the torch models (baselines compute with numpy on the CPU)."""
    meta_file, meta = read_model_meta(path)
    name = name_of(str(meta.get("class")))
    if name is None:
        raise InputError(meta_file, f"unknown model class {meta.get('class')!r}; expected one of "
                         f"{sorted(model_class(n).__name__ for n in model_names())}")
    if device is not None:
        resolve_device(device)  # an explicit CUDA without CUDA is an error even for the numpy baselines
    return model_class(name).load(path, device=device)
