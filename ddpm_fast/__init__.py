"""ddpm-fast: a performance-engineered DDPM trainer and sampler for PyTorch."""
from .diffusion import GaussianDiffusion
from .model import UNet
from .presets import PRESETS
from .sampling import FastSampler, sample

__all__ = ["UNet", "PRESETS", "GaussianDiffusion", "sample", "FastSampler"]
__version__ = "0.1.0"
