"""The service layer: what the API and the broker link do, over the repositories."""
