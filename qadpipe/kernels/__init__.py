"""Native CPU kernels, compiled on first use for the machine that runs them (``build``)."""
