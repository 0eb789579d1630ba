"""Federated continual learning on Flower: a fleet of devices, each learning its own stream."""
