"""Experiments through Flower's simulation engine: single runs (``simulation.run``) and grids."""
