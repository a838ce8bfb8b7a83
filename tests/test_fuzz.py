"""A schema-driven fuzzer (schemathesis) against a real `exporter serve`: requests generated
from the service's own /openapi.json, with a valid key, must get no 5xx and no answer that
contradicts the document (status codes, content types, headers, bodies). Bounded and seeded
(derandomized), so that a run is the same each time and quick."""

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import CheckFunction, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    positive_data_acceptance,
)

from tests.support.database import export_database, new_key
from tests.support.server import Server, running_server

# Examples per operation and mode: enough to reach every parameter and error the document
# describes, in some 20 s in all. EXPORTER_FUZZ_EXAMPLES asks for a longer hunt (300 found
# nothing more on 2026-12-08).
EXAMPLES = int(os.environ.get("EXPORTER_FUZZ_EXAMPLES", "50"))


@dataclass
class Fuzzed:
    server: Server
    admin_key: str


# A database of its own: jobs the fuzzer submits stay out of the other tests' queue.
TABLES = (
    "CREATE TABLE public.items (id integer PRIMARY KEY, name text, price numeric(10, 2),"
    " at timestamptz, tags text[])",
    "INSERT INTO public.items SELECT i, 'item ' || i, i * 1.5, '2026-01-01'::timestamptz"
    " + i * interval '1 hour', ARRAY['a', 'b'] FROM generate_series(1, 500) AS i",
)


@pytest.fixture(scope="module")
def fuzzed(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    with export_database(server_url, *TABLES) as database:
        with running_server(database.url, tmp_path_factory.mktemp("fuzz")) as server:
            yield Fuzzed(server, new_key(database.url, admin=True))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_request_is_a_5xx_or_an_answer_the_schema_contradicts(
    fuzzed: Fuzzed, mode: GenerationMode
) -> None:
    """Positive: requests the document allows, each answered as it says. Negative: requests
    it does not allow, none a 5xx, each answer as the document says."""
    headers = {"Authorization": f"Bearer {fuzzed.admin_key}"}
    # A filter, `select`, `order` or `since` is a little language of its own, which no JSON
    # schema can tell right from wrong: a well-formed string may rightly be a documented 400.
    excluded: list[CheckFunction] = [positive_data_acceptance]
    if mode is GenerationMode.NEGATIVE:
        # Every request carries the key, so a negative case that leaves the Authorization
        # header out is sent with it all the same, and rightly answered.
        excluded.append(negative_data_rejection)
    schema = schemathesis.openapi.from_url(f"{fuzzed.server.base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # the document itself is valid OpenAPI
        operation = result.ok()
        # A dataset's routes once with generated names (404s, mostly), once with the real
        # one, so that filters and options meet real columns.
        fixed: list[dict[str, str]] = [{}]
        if "{name}" in operation.path:
            fixed.append({"name": "items"})
        for path_parameters in fixed:
            strategy = operation.as_strategy(mode, path_parameters=path_parameters or None)
            try:
                _fuzz(strategy, headers, excluded)
            except Unsatisfiable:
                # A route without parameters has no request the document does not allow.
                assert mode is GenerationMode.NEGATIVE, operation.label
            except (Exception, BaseExceptionGroup) as exc:  # every operation's, not the first
                failures.append(f"{operation.label} {path_parameters}: {exc}")
    assert not failures, "\n\n".join(failures)


def _fuzz(
    strategy: SearchStrategy[schemathesis.Case[Any]],
    headers: dict[str, str],
    excluded: list[CheckFunction],
) -> None:
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: schemathesis.Case[Any]) -> None:
        case.call_and_validate(headers=headers, timeout=30, excluded_checks=excluded)

    fuzz()
