# Tessera on one NVIDIA GPU. The base image brings CUDA, PyTorch and Triton; we add Tessera.
#
#   docker build -t tessera .
#   docker run --gpus all -p 8000:8000 \
#       -v /path/to/hf-model:/model:ro -v /path/to/library:/library:ro \
#       tessera --model /model --library /library
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/tessera
COPY pyproject.toml README.md ./
COPY server ./server
COPY router ./router
COPY tessera_kernels ./tessera_kernels
COPY training ./training
RUN pip install --no-cache-dir .

VOLUME ["/model", "/library"]
EXPOSE 8000
ENTRYPOINT ["tessera", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/model", "--library", "/library"]
