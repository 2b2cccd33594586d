# pluto-stream: one image for `pluto server` (backend) and `pluto worker`, used by
# docker-compose*.yml and deploy/k8s alike. The project is installed at build time (wheels
# built in a first stage, installed without network in the second); it runs as a non-root user.
#   docker build -t pluto-stream:0.1.0 .
#   docker run --rm -e PLUTO_API_KEY=... -p 8080:8080 pluto-stream:0.1.0 server
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pluto ./pluto
COPY worker ./worker
COPY backend ./backend
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[server,postgres]'

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'pluto-stream[server,postgres]' \
    && rm -rf /wheels \
    && useradd --create-home --uid 10001 pluto \
    && mkdir /data && chown pluto /data
USER 10001
WORKDIR /home/pluto
# The backend listens on PLUTO_API_URL's host:port; workers are given the backend's URL instead.
ENV PYTHONUNBUFFERED=1 PLUTO_API_URL=http://0.0.0.0:8080 PLUTO_DB_URL=sqlite:////data/pluto.db
EXPOSE 8080 9464
ENTRYPOINT ["pluto"]
CMD ["server"]
