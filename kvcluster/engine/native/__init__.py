"""C sources of the engine's optional native kernels (compiled on first use)."""
