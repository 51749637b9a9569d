"""Protocols: how a backbone becomes a classifier (frozen features + tuned head; fine-tuning next)."""
