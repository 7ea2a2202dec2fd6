"""The database: tables, engine, migrations, one repository module per aggregate."""
