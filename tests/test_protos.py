"""The committed generated modules must be what swarm.proto generates today."""

from pathlib import Path

from protos import build

PROTOS = Path(build.__file__).parent


def test_generated_code_is_fresh(tmp_path):
    for generated in build.generate(tmp_path):
        committed = PROTOS / generated.name
        assert committed.exists(), f"{generated.name} is missing: run `python -m protos.build`"
        assert committed.read_text() == generated.read_text(), (
            f"{generated.name} is stale: run `python -m protos.build` and commit the result"
        )
