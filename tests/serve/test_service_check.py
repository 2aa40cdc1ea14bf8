"""Service.check: a job is checked, and its model names resolved, on a copy; the caller's job is never changed."""

from __future__ import annotations

import pytest
from PIL import Image

from controlnet.generate.jobs import ControlUnit, GenerationJob
from controlnet.serve.models import ModelRegistry, UnknownModel
from controlnet.serve.service import FieldError, Service


@pytest.fixture(scope="module")
def service():
    svc = Service(ModelRegistry(), max_units=2, device="cpu")
    yield svc
    svc.close()


def _job(model: str = "Builtin:Canny", **unit) -> GenerationJob:
    return GenerationJob(
        prompt="x", base="BUILTIN", units=[ControlUnit(model=model, image=Image.new("RGB", (8, 8)), **unit)]
    )


def test_check_returns_a_resolved_copy_and_leaves_the_job_alone(service):
    job = _job()
    checked = service.check(job)
    assert (job.base, job.units[0].model) == ("BUILTIN", "Builtin:Canny")
    assert (checked.base, checked.units[0].model) == ("builtin", "builtin:canny")
    assert checked is not job and checked.units[0] is not job.units[0]
    assert checked.units[0].image is job.units[0].image  # a shallow copy: the pixels are not copied


def test_submit_queues_the_checked_copy(service):
    job = _job()
    queued = service.submit(job)
    service.cancel(queued.id)
    assert queued.spec.units[0].model == "builtin:canny" and job.units[0].model == "Builtin:Canny"


def test_refusals_name_the_field_and_change_nothing(service):
    job = _job(model="nope")
    with pytest.raises(UnknownModel) as info:
        service.check(job)
    assert info.value.field == "units[0].model" and job.units[0].model == "nope" and job.base == "BUILTIN"
    outputs = service.registry.controlnet("builtin:canny").num_control_outputs
    with pytest.raises(FieldError, match=f"has {outputs} outputs") as info:
        service.check(_job(block_scales=[1.0] * (outputs - 1)))
    assert info.value.field == "units[0].block_scales"
    assert service.check(_job(block_scales=[0.5] * outputs)).units[0].block_scales == [0.5] * outputs


def test_num_control_outputs_is_the_loaded_nets(service):
    from controlnet import load_controlnet

    entry = service.registry.controlnet("builtin:canny")
    assert entry.num_control_outputs == load_controlnet(entry.path).num_control_outputs
    assert service.registry.base().num_control_outputs is None
