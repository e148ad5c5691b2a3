# rewardq image: workers, Flower, the local judge and the CLI (docker-compose.yml).
#   docker build -t rewardq .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned, from the CPU wheel index: the trainer-side penalties need only the
# CPU build, and a looser pin (or PyPI's default wheel) pulls several GB of CUDA packages.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

WORKDIR /app
# Dependencies before the code, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir -p broker workers producer monitoring judge_server rewardq \
    && touch broker/__init__.py workers/__init__.py producer/__init__.py \
             monitoring/__init__.py judge_server/__init__.py rewardq/__init__.py \
    && pip install . \
    && pip uninstall -y rewardq \
    && rm -rf broker workers producer monitoring judge_server rewardq build
COPY broker ./broker
COPY workers ./workers
COPY producer ./producer
COPY monitoring ./monitoring
COPY judge_server ./judge_server
COPY rewardq ./rewardq
RUN pip install --no-deps . && rm -rf build

# No root at run time; /data holds Flower's state file.
RUN useradd --create-home --uid 10001 rewardq && mkdir -p /data && chown rewardq /data
USER rewardq
WORKDIR /home/rewardq

# Worker metrics (REWARDQ_METRICS_PORT), Flower, the local judge.
EXPOSE 9808 5555 8008
CMD ["rewardq", "worker"]
