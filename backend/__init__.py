"""Tandem: a Label Studio ML backend with an active-learning loop."""
