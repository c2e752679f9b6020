"""Persistence behind repositories (SQLAlchemy Core): stored predictions, task scores, projects."""
