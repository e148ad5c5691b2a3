"""The worker fleet: Celery tasks that judge chunks of items on a gevent pool."""
