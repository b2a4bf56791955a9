"""Framework-free retrieval math: the knowledge store, the kNN distribution and mixture, the loss,
neural demonstrations and the configs. Imports numpy, FAISS and torch; never openprompt or transformers."""
from .config import DemonstrationConfig, KeyConfig, LossConfig, MixtureConfig, ReadoutConfig, RetroConfig
from .demonstrations import demonstration_weights, neural_demonstrations
from .knn import (Mixture, MixtureChoice, MixtureGrid, TemperatureChoice, accuracy, choose_temperature, knn_label_distribution,
                  knn_weights, log_loss, mix, select_mixture, temperature_scale)
from .loss import knn_guided_loss, knn_loss_weights
from .readout import class_mean_distribution, class_mean_scores
from .store import KnowledgeStore, SaveFailed, SearchResult, StoreError

__all__ = ["LossConfig", "DemonstrationConfig", "KeyConfig", "ReadoutConfig", "MixtureConfig", "RetroConfig", "demonstration_weights", "neural_demonstrations", "Mixture", "MixtureChoice",
           "MixtureGrid", "accuracy", "knn_label_distribution", "knn_weights", "mix", "select_mixture",
           "knn_guided_loss", "knn_loss_weights", "TemperatureChoice", "choose_temperature", "log_loss",
           "temperature_scale", "class_mean_distribution", "class_mean_scores",
           "KnowledgeStore", "SaveFailed", "SearchResult", "StoreError"]
