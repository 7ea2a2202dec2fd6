"""The HTTP API: routes, authentication, request and response models."""
