"""Flower's floor: fedclip's deployed round without fedclip (flwr and numpy only)."""
