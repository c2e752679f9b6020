"""The predict job's bulk-import sizes (`write_threshold`): Label Studio 1.23's default prediction import
recounts every predicted task of the project per request, so the job's requests grow with what it has written.
Simulated here on the job's own rule: the recount work stays near-linear in the project's size."""

from __future__ import annotations

import pytest

from backend.batch.predict_job import JobOptions, write_threshold


def requests_for(tasks: int, options: JobOptions) -> list[int]:
    """The sizes of the bulk imports the job makes for `tasks` predictions, one prediction at a time."""
    sizes, handed, pending = [], 0, 0
    for _ in range(tasks):
        pending += 1
        if pending >= write_threshold(handed, options):
            sizes.append(pending)
            handed, pending = handed + pending, 0
    if pending:
        sizes.append(pending)
    return sizes


def test_starts_at_write_batch_grows_to_twice_what_was_written_and_stops_at_the_cap():
    o = JobOptions(write_batch=256, max_write_batch=4096)
    assert write_threshold(0, o) == 256
    assert write_threshold(100, o) == 256
    assert write_threshold(512, o) == 1024
    assert write_threshold(1500, o) == 3000
    assert write_threshold(4000, o) == 4096
    assert write_threshold(10**6, o) == 4096


def test_a_5000_task_project_is_written_in_four_requests():
    """By hand: 256 first, then twice what went before (512, 1536), the rest (2696) when the job ends."""
    assert requests_for(5_000, JobOptions(write_batch=256, max_write_batch=4096)) == [256, 512, 1536, 2696]


def test_a_100000_task_project_grows_to_the_default_cap_of_16384():
    """By hand: 256, 512, 1536, 4608, 13824 (twice what went before), then the cap four times (65536), and the
    rest, 100000 - 20736 - 65536 = 13728, when the job ends: ten requests."""
    assert requests_for(100_000, JobOptions()) == [256, 512, 1536, 4608, 13824] + [16384] * 4 + [13728]


@pytest.mark.parametrize("tasks", [100, 5_000, 100_000])
def test_every_prediction_is_written_once_and_the_recount_work_is_near_linear(tasks):
    o = JobOptions()
    sizes = requests_for(tasks, o)
    assert sum(sizes) == tasks and max(sizes) <= o.max_write_batch
    # Label Studio recounts every task that holds a prediction after each request: sum of the running totals
    recount, total = 0, 0
    for size in sizes:
        total += size
        recount += total
    fixed = sum(min(tasks, o.write_batch * (k + 1)) for k in range(-(-tasks // o.write_batch)))
    if tasks <= 512:
        assert recount == fixed  # small projects: the same requests as a fixed size
    else:
        assert recount < fixed / 6  # a sixth of the fixed size's work at 5,000 tasks; 1/50 at 100,000
    assert recount <= {100: 1, 5_000: 1.7, 100_000: 3.8}[tasks] * tasks
