"""Active learning: scores and review queues (built in the active-learning issue)."""
