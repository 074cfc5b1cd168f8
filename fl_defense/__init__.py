"""fl-defense: backdoor defenses for federated learning, as Flower strategies."""

__version__ = "0.1.0"
