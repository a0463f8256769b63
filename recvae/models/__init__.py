"""Models: torch modules (networks) apart from the estimators that train them, and baselines."""

from recvae.models.base import Recommender

__all__ = ["Recommender"]
