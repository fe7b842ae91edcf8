"""Tests that start their own multi-node Ray cluster (``ray.cluster_utils.Cluster``), each in a subprocess."""
