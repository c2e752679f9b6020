import pytest

from tests.security.servers import Recorder


@pytest.fixture()
def servers():
    """Label Studio's stand-in on 127.0.0.1, an 'other' host on 127.0.0.2 and an 'internal' one on 127.0.0.3."""
    made = [Recorder("127.0.0.1"), Recorder("127.0.0.2"), Recorder("127.0.0.3")]
    yield made
    for server in made:
        server.close()
