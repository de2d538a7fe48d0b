-- Second database for the basic-auth app's users and permissions (the first, mlflow, is POSTGRES_DB).
CREATE DATABASE mlflow_auth;
