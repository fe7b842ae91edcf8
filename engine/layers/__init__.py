"""Layers that own their weight loading, so that models only compose them."""
