"""The model zoo: teacher format, stores (local folder, S3), manifest, safe loading, demo zoo."""
