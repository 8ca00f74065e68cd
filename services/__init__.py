"""The long-running processes of recstack: the stream consumer, the replay publisher, the ranking service."""
