"""The control plane: ``edge-agent server``, a management service with a database.

Install with the ``server`` extra. It speaks Losant's Edge/Embedded Deployments and
Devices APIs over HTTP, keeps the fleet's inventory and deployment records in a
database (SQLite or PostgreSQL), and is the writer of its devices' desired documents
on the broker.
"""
