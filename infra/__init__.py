"""Deployment: Docker, Modal."""
