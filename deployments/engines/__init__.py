"""Inference engines behind the `Engine` protocol (base.py); factory.py creates one by name."""
