"""Flower ClientApp for fedpeft."""
