# The genq image for the Linux side of docker-compose.yml: the HTTP gateway, `genq metrics`, and
# llama.cpp workers (with the C++ llama-server). mlx workers run natively on the Macs, not here.
#
#   docker build -t genq:latest .

# -- llama-server, built from the llama.cpp sources vendored in the llama-cpp-python sdist ---------
FROM python:3.11-slim-bookworm AS llama-server
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
COPY ops/build_llama_server.sh /src/ops/build_llama_server.sh
RUN /src/ops/build_llama_server.sh --prefix /opt/llama

# -- runtime -------------------------------------------------------------------------------------
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 genq
COPY --from=llama-server /opt/llama/bin/llama-server /usr/local/bin/llama-server
WORKDIR /opt/genq
COPY pyproject.toml README.md ./
COPY genq ./genq
COPY jobcontract ./jobcontract
COPY producer ./producer
COPY workers ./workers
RUN pip install --no-cache-dir ".[gateway]"
USER genq
ENV GENQ_LOG_DIR=/home/genq/logs \
    PYTHONUNBUFFERED=1
# gateway, worker metrics, cluster metrics
EXPOSE 8000 9101 9102
CMD ["genq", "--help"]
