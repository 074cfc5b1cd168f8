"""The Flower ClientApp of fl-defense: a NumPyClient that trains, optionally attacks, ships Fisher."""
