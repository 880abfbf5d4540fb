"""The DePHY wire protocol: pure parsing and serialization, proven against the vectors."""
