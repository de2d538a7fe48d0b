"""Training, evaluation, tracking and checkpoint selection (the only package that imports deepspeed and mlflow)."""
