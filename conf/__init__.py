"""The conf/ tree, shipped inside the package as ``raysft.conf`` (found by Hydra as ``pkg://raysft.conf``)."""
