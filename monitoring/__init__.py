"""Operating the fleet: worker metrics, cost accounting, Flower, ``rewardq stats``.

- ``monitoring.metrics``: Prometheus metrics of a worker process and their endpoint;
- ``monitoring.costs``: the judge price table and per-step / cumulative costs;
- ``monitoring.flower``: Flower against the configured broker, auth and loopback rules;
- ``monitoring.stats_view``: the live terminal view behind ``rewardq stats``;
- ``monitoring.ops_cli``: the ``flower`` and ``stats`` subcommands of ``rewardq``;
- ``grafana/``, ``prometheus.yml``, ``alerts.yml``: dashboards, scraping and alerts
  for ``docker-compose.yml``.
"""
