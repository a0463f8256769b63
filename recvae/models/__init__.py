"""Models: torch modules (networks) apart from the estimators that train them, and baselines."""

from recvae.models.base import Recommender

__all__ = ["Recommender"]
from recvae.models.ease import EASE, select_ease_l2  # noqa: E402
from recvae.models.popularity import Popularity  # noqa: E402

__all__ += ["EASE", "Popularity", "select_ease_l2"]
from recvae.models.vae import MultDAE, MultVAE, NonFiniteLossError  # noqa: E402

__all__ += ["MultDAE", "MultVAE", "NonFiniteLossError"]
