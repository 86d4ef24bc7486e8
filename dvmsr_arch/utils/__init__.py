"""Helpers shared by the scripts: image I/O, tiled inference, building a network with its weights."""
