"""The Flower ServerApp of fl-defense: builds the strategy from run config, evaluates, records."""
