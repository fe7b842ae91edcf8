"""Speculative decoding: proposers guess the next k tokens, the target verifies them in one forward pass."""
