"""Run Alembic programmatically, so `exporter migrate` needs no alembic.ini."""

from pathlib import Path

from alembic import command
from alembic.config import Config

# exporter/schema/migrate.py: the package is two levels up.
_PACKAGE = Path(__file__).resolve().parents[1]
# In a checkout (or an editable install) the scripts sit next to the package; a wheel can only
# carry them inside it, as exporter/migrations (hatch's force-include).
MIGRATIONS = next(
    (path for path in (_PACKAGE.parent / "migrations", _PACKAGE / "migrations") if path.is_dir()),
    _PACKAGE.parent / "migrations",
)


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    # '%' is interpolation syntax in Alembic's config; a password may contain one.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)
