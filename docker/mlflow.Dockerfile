# MLflow server with the PostgreSQL driver; keep the version in step with recscale's (pip show mlflow).
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" psycopg2-binary
EXPOSE 5000
