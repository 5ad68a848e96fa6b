"""vaelab: experiment-tracked training of Variational Autoencoders."""
__version__ = "0.1.0"
