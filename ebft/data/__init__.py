"""Training data: sources read into examples (sources.py), tokenized, packed into fixed-length chunks and
streamed in a resumable order (chunks.py)."""
