"""Instrumentation the fleet carries: worker metrics and cost accounting.

- ``rewardq.monitoring.metrics``: Prometheus metrics of a worker process and their endpoint;
- ``rewardq.monitoring.costs``: the judge price table and per-step / cumulative costs;
- ``grafana/``, ``prometheus.yml``, ``alerts.yml``: dashboards, scraping and alerts
  for ``docker-compose.yml``.

The operator apps that read them (Flower's launcher ``rewardq.flower``, the live view
``rewardq.stats_view`` behind ``rewardq stats``) live in ``rewardq/``, the top layer, so
that workers import instrumentation and nothing that imports them back.
"""
