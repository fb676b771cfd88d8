"""Weights through the broker: a source serves tensors, a device fetches exactly its own."""
