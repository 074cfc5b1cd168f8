import pytest


@pytest.fixture(autouse=True)
def _flower_task_identity():
    """Message-API strategies build Messages, which need a run id (a running ServerApp sets one)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
