"""Flower ServerApp for fedpeft."""
