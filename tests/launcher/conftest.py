import pytest
from jobs import prepare_data


@pytest.fixture(scope="session")
def prepared_data(tmp_path_factory):
    """A small real corpus: stdlib subset -> SentencePiece (vocab 1000) -> train/heldout shards."""
    return prepare_data(tmp_path_factory.mktemp("data"))
