"""Operations: Prometheus metrics, cost accounting, Flower, the stats view."""
