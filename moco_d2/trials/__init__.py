"""Comparing backbones over repeated detection trials, on one machine or a cluster."""
