"""Which datasets a key may read: decided here, once, for every route."""

from exporter.access.keys import ApiKey
from exporter.db.pool import Databases
from exporter.errors import NotFound
from exporter.pipeline.catalog import Dataset, find_dataset
from exporter.pipeline.query import shown
from exporter.settings import Settings


async def readable_dataset(
    name: str, key: ApiKey, settings: Settings, databases: Databases
) -> Dataset:
    """The dataset `name` if the key may read it; NotFound otherwise."""
    # Outside the key's scope, exactly as if the dataset did not exist: the same 404, and
    # decided before the catalog is asked, so that timing says nothing either.
    dataset = None
    if key.may_read(name):
        dataset = await find_dataset(
            databases.catalog, settings.exposed_schemas, name, role=key.role
        )
    if dataset is None:
        raise NotFound(f"no dataset named {shown(name)!r}")
    return dataset
