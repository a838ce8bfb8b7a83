"""The service's own schema: SQLAlchemy models and the migrations runner."""
