"""Run directories in local or object storage (``s3://``, ``gs://``) through ``pyarrow.fs``."""
