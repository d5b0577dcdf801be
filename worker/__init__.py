"""The scoring service: Celery app and settings, thin tasks, the scoring engine, model cache, submit client."""
