"""A tensor-parallel model worker in Serve: the replica is rank 0, its placement group's second bundle holds rank 1
(a Ray actor it starts), and the two talk through torch.distributed (gloo on CPUs). Its answers must be the
single-process engine's, and its pool free afterwards."""

import httpx
import pytest

from tests.serve.conftest import MODEL_NAME, side_app

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]

APP, ROUTE = "gpt2-tp2", "/tp2"
PROMPTS = ["the river and the market", "a song of night", "price"]


@pytest.fixture(scope="module")
def tp_app(service):
    with side_app(service, APP, ROUTE, {**service.engine.model_dump(mode="json"), "tensor_parallel_size": 2}) as svc:
        yield svc


def test_tensor_parallel_worker_answers_as_one_process(tp_app, service):
    from ray.util.placement_group import placement_group_table

    from gpt2serve import LLM, SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [o.outputs[0].text for o in LLM(service.engine).generate(PROMPTS, params)]
    got = []
    with httpx.Client(base_url=tp_app.base_url, timeout=60) as client:
        for prompt in PROMPTS:
            r = client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            got.append(r.json()["choices"][0]["text"])
    assert got == want
    # The worker's placement group: two bundles (one per rank), both placed.
    groups = [g for g in placement_group_table().values() if g["state"] == "CREATED" and len(g["bundles"]) == 2]
    assert groups and all(b == {"CPU": 0.25} for b in groups[0]["bundles"].values()), groups
    tp_app.wait_idle()
