"""The seeded fuzzer (tests/fuzzing.py) against a real mesh on the 3-node cluster: 1,000+ cases over
Forward, ExpertWorker.Compute and every MeshAdmin method. Every answer is one of the codes its case
allows (never UNKNOWN or INTERNAL), every OK answer equals the in-process reference, and a valid
Forward after every 100 cases is answered right. bench/fuzz_mesh.py runs 10,000."""

from __future__ import annotations

from tests.fuzzing import CATEGORIES, Fuzzer, alive_check, fuzz_target, run

PER_CATEGORY = 100  # x 16 categories: 1,600 cases (floods: 2 x 64)
MAX_TOKENS = 32


def test_a_thousand_fuzzed_calls_get_the_codes_they_should_and_right_answers(meshes, zoo):
    path = zoo.checkpoint("mixtral")
    mesh = meshes.get(path, key="fuzz", admin_token="fuzz-admin", read_token="fuzz-read",
                      router={"max_request_tokens": MAX_TOKENS, "max_queue_tokens": 64 * MAX_TOKENS})
    target = fuzz_target(mesh, path, MAX_TOKENS)
    outcome = run(Fuzzer(target, seed=0), PER_CATEGORY, alive_check(target))
    total = sum(outcome.codes.values())
    assert total >= 1000, total
    assert outcome.failures == [], "\n".join(outcome.failures[:20])
    codes = {code for _, code in outcome.codes}
    assert not codes & {"UNKNOWN", "INTERNAL"}, outcome.codes
    by_category = {c: sum(n for (cat, _), n in outcome.codes.items() if cat == c) for c in CATEGORIES}
    assert all(n >= PER_CATEGORY for n in by_category.values()), by_category
    assert outcome.codes[("shapes", "OK")] and outcome.codes[("dtypes", "OK")] and outcome.codes[("counts", "OK")]
    print({f"{cat}/{code}": n for (cat, code), n in sorted(outcome.codes.items())})
