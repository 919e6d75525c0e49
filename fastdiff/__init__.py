"""fastdiff: fast sampling from diffusion models and fast feature extraction."""

from fastdiff import models, nn, ops, samplers, schedules
from fastdiff.denoiser import Denoiser
from fastdiff.engine import clear_cache, sample
from fastdiff.features import FeatureExtractor

__version__ = "0.1.0"

__all__ = ["ops", "nn", "models", "schedules", "samplers", "Denoiser", "sample", "clear_cache", "FeatureExtractor",
           "__version__"]
