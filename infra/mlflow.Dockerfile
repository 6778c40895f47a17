# syntax=docker/dockerfile:1
# MLflow tracking server for infra/k8s/mlflow.yaml: PostgreSQL backend store, S3 artifacts (proxied).
# The raysl image lacks a PostgreSQL driver and carries torch it does not need here.
#   docker build -f infra/mlflow.Dockerfile -t raysl-mlflow:3.17.2 infra
FROM python:3.11-slim
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.34,<2" \
 && useradd --create-home --uid 1000 mlflow
USER mlflow
ENV MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
EXPOSE 5000
ENTRYPOINT ["mlflow"]
CMD ["server", "--help"]
