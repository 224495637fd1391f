"""Task data: generators, webdataset shards with a manifest, and a resumable loader.

Kept import-light: each submodule imports what it needs.
"""
