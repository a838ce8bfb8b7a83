"""Whether a Docker engine answers, for the test database's second choice (testcontainers)."""

import gc
import warnings


def docker_answers() -> bool:
    # docker.from_env() asks the engine's version, and with no engine behind its socket leaves
    # that socket to the garbage collector: a ResourceWarning that the warnings-as-errors
    # setting raises in whichever test the collector happens to run in. Collected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return _ping_docker()
        finally:
            gc.collect()


def _ping_docker() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()
