"""Fleet Evolution Engine: the Prefect-free domain core."""
