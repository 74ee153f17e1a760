"""What users import to talk to a Sift server."""
