"""Put first on PYTHONPATH, this stands for "mpi4py is not installed"."""

raise ImportError("No module named 'mpi4py' (tests/launchers/no_mpi4py hides it)")
