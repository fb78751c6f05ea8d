"""Data: the canonical tables and their validation, source adapters, storage at any URI, and
the embeddings' file format. Imports only config and errors."""
