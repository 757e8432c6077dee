"""The HTTP contract without HTTP: the OpenAI request model, its validation, error-to-status table."""
