# rewardq image: workers, Flower, the gateway, the local judge and the CLI
# (docker-compose.yml). The lean worker install: no torch, no transformers (those are
# the trainer's, `rewardq[trainer]`).
#   docker build -t rewardq .
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Dependencies before the code, so a code change does not reinstall them; exact versions
# from constraints.txt, the set the tests ran with. The extras of what the image runs.
COPY pyproject.toml README.md LICENSE constraints.txt ./
# The component folders install as rewardq.<component> through links in rewardq/.
RUN mkdir -p broker judge workers producer gateway monitoring judge_server rewardq \
    && for c in broker judge workers producer gateway monitoring judge_server; do \
           touch "$c/__init__.py" && ln -s "../$c" "rewardq/$c"; done \
    && mkdir rewardq/integrations \
    && touch rewardq/__init__.py rewardq/integrations/__init__.py \
    && pip install -c constraints.txt ".[worker,gateway,judge]" \
    && pip uninstall -y rewardq \
    && rm -rf broker judge workers producer gateway monitoring judge_server rewardq build
COPY broker ./broker
COPY judge ./judge
COPY workers ./workers
COPY producer ./producer
COPY gateway ./gateway
COPY monitoring ./monitoring
COPY judge_server ./judge_server
COPY rewardq ./rewardq
RUN pip install --no-deps . && rm -rf build

# No root at run time (numeric, so Kubernetes' runAsNonRoot can check it); /data holds
# Flower's state file.
RUN useradd --create-home --uid 10001 rewardq && mkdir -p /data && chown 10001 /data
USER 10001
WORKDIR /home/rewardq

# Worker metrics (REWARDQ_METRICS_PORT), Flower, the gateway, the local judge.
EXPOSE 9808 5555 8000 8008
CMD ["rewardq", "worker"]
