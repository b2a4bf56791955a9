"""Framework-free retrieval math: the knowledge store, the kNN distribution and mixture, the loss,
neural demonstrations and the configs. Imports numpy, FAISS and torch; never openprompt or transformers."""
from .config import LossConfig, RetroConfig
from .demonstrations import demonstration_weights, neural_demonstrations
from .knn import MixtureChoice, MixtureGrid, accuracy, knn_label_distribution, knn_weights, mix, select_mixture
from .loss import knn_guided_loss, knn_loss_weights
from .store import KnowledgeStore, SearchResult, StoreError

__all__ = ["LossConfig", "RetroConfig", "demonstration_weights", "neural_demonstrations", "MixtureChoice",
           "MixtureGrid", "accuracy", "knn_label_distribution", "knn_weights", "mix", "select_mixture",
           "knn_guided_loss", "knn_loss_weights",
           "KnowledgeStore", "SearchResult", "StoreError"]
