"""Audit: the record and its field names, the writer and its rotating files, event extraction, summary."""
