import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Feature nets and other cached artefacts go to a per-session folder, never to the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JUMPFLOW_CACHE", str(tmp_path_factory.mktemp("jumpflow-cache")))
    yield
    mp.undo()
