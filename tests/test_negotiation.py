import pytest

from exporter.http.negotiation import negotiate

OFFERS = ["application/json", "text/csv", "application/x-ndjson"]


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("text/csv", "text/csv"),
        ("TEXT/CSV; charset=utf-8", "text/csv"),
        ("text/*", "text/csv"),
        ("application/*", "application/json"),
        ("application/x-ndjson, application/json;q=0.5", "application/x-ndjson"),
        ("text/html,application/xhtml+xml,*/*;q=0.8", "application/json"),
        ("text/csv;q=0, */*", "application/json"),
        ("*/*;q=0.1, text/csv;q=0", "application/json"),
        ("application/xml", None),
        ("text/csv;q=0", None),
        ("garbage", None),
        ("text/csv;q=abc, application/x-ndjson", "application/x-ndjson"),
        ("text/csv;q=0.5, application/x-ndjson;q=0.499", "text/csv"),
        ("text/csv; q = 0.5 , application/x-ndjson;q=0.4", "text/csv"),
        # Weights that are not RFC 9110 qvalues (float() takes them all) are 0: the range
        # is not acceptable. nan compared as neither more nor less than anything.
        ("text/csv;q=nan", None),
        ("text/csv;q=inf", None),
        ("text/csv;q=1e9", None),
        ("text/csv;q=1_0", None),
        ("text/csv;q=-1", None),
        ("text/csv;q=2", None),
        ("text/csv;q=0.0001", None),
        ("text/csv;q=nan, application/x-ndjson;q=0.1", "application/x-ndjson"),
        ("*/*;q=nan, text/csv;q=0.1", "text/csv"),
    ],
)
def test_negotiate(accept: str | None, chosen: str | None) -> None:
    assert negotiate(accept, OFFERS) == chosen
