"""Shared machinery of the segmentation-data ETL: DAG, fingerprints, shards, executors, data, models."""
