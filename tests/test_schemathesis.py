"""Property-based fuzzing of the whole OpenAPI surface with schemathesis: no generated input may produce
a 5xx. (Driven through hypothesis directly: schemathesis' pytest plugin does not load under pytest 9.)"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from backend.server.app import create_app
from backend.serving import ModelHolder
from backend.settings import Settings


def test_no_generated_input_gives_a_server_error(tmp_path, detect_adapter):
    app = create_app(Settings(home=tmp_path / "home", local_files_root=tmp_path), ModelHolder(detect_adapter),
                     training=False)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/health", "/setup", "/predict", "/webhook", "/versions", "/train", "/jobs/{job_id}"} <= paths
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(checks=[not_a_server_error])

        fuzz()
