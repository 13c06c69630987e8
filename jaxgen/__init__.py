"""jaxgen: train, sample and evaluate diffusion and flow generative models in JAX."""

__version__ = "0.1.0"
