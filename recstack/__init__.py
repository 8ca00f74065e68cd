"""recstack: the console command and the generated gRPC stubs (``recstack.v1``)."""

__version__ = "0.1.0"
